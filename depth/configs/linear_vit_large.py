# NYU 1x1 probe, ViT-L (PROTOCOLS E): lr 1e-4.
_base_ = ["./linear_vit_small.py"]
embed_dim = 1024
model = dict(
    backbone=dict(out_indices=(7, 11, 15, 23)),
    decode_head=dict(in_channels=[embed_dim] * 4, channels=4 * embed_dim),
)
optim_wrapper = dict(optimizer=dict(lr=1e-4))
