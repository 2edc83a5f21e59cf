# ADE20K UperNet fine-tuning, ViT-B (PROTOCOLS D): drop path 0.1, 60000 iterations, 4 images per GPU.
_base_ = ["./upernet_vit_small.py"]
embed_dim = 768
num_layers = 12
iters = 60000
model = dict(
    backbone=dict(out_indices=(3, 5, 7, 11), drop_path_rate=0.1),
    neck=dict(embed_dim=embed_dim),
    decode_head=dict(in_channels=[embed_dim] * 4, channels=embed_dim),
    auxiliary_head=dict(in_channels=embed_dim),
)
optim_wrapper = dict(paramwise_cfg=dict(num_layers=num_layers))
train_dataloader = dict(batch_size=4)  # per GPU
