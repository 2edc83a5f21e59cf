# ADE20K UperNet fine-tuning, ViT-L (PROTOCOLS D): drop path 0.2, 160000 iterations, 2 images per GPU;
# evaluated and checkpointed every 16000 iterations (the reference's 160k schedule).
_base_ = ["./upernet_vit_small.py"]
embed_dim = 1024
num_layers = 24
iters = 160000
model = dict(
    backbone=dict(out_indices=(7, 11, 15, 23), drop_path_rate=0.2),
    neck=dict(embed_dim=embed_dim),
    decode_head=dict(in_channels=[embed_dim] * 4, channels=embed_dim),
    auxiliary_head=dict(in_channels=embed_dim),
)
optim_wrapper = dict(paramwise_cfg=dict(num_layers=num_layers))
train_dataloader = dict(batch_size=2)  # per GPU
train_cfg = dict(max_iters=iters, val_interval=16000)
default_hooks = dict(checkpoint=dict(interval=16000))
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type="PolyLR", power=1.0, eta_min=0.0, by_epoch=False, begin=1500, end=iters),
]
