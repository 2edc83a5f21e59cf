# NYU 1x1 probe, ViT-B (PROTOCOLS E): lr 1e-4.
_base_ = ["./linear_vit_small.py"]
embed_dim = 768
model = dict(
    backbone=dict(out_indices=(3, 5, 7, 11)),
    decode_head=dict(in_channels=[embed_dim] * 4, channels=4 * embed_dim),
)
optim_wrapper = dict(optimizer=dict(lr=1e-4))
