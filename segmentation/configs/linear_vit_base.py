# ADE20K linear probe, ViT-B (PROTOCOLS D).
_base_ = ["./linear_vit_small.py"]
embed_dim = 768
model = dict(
    backbone=dict(out_indices=(3, 5, 7, 11)),
    decode_head=dict(in_channels=[embed_dim] * 4, channels=4 * embed_dim),
)
