# NYU DPT fine-tuning, ViT-L (PROTOCOLS E): post-process channels [128, 256, 512, 1024], lr 1e-4.
_base_ = ["./dpt_vit_small.py"]
embed_dim = 1024
model = dict(
    backbone=dict(out_indices=(7, 11, 15, 23)),
    decode_head=dict(in_channels=[embed_dim] * 4, embed_dims=embed_dim, post_process_channels=[128, 256, 512, 1024]),
)
optim_wrapper = dict(optimizer=dict(lr=1e-4))
