# NYU DPT fine-tuning, ViT-B (PROTOCOLS E): post-process channels [96, 192, 384, 768], lr 1e-4.
_base_ = ["./dpt_vit_small.py"]
embed_dim = 768
model = dict(
    backbone=dict(out_indices=(3, 5, 7, 11)),
    decode_head=dict(in_channels=[embed_dim] * 4, embed_dims=embed_dim, post_process_channels=[96, 192, 384, 768]),
)
optim_wrapper = dict(optimizer=dict(lr=1e-4))
