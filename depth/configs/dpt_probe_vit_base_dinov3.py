# NYU DPT probe, DINOv3-layout ViT-B/16 (PROTOCOLS G): dpt_probe_vit_base.py at DINOv3's dense setting,
# 512 crops (dinov3_nyu.py) and blocks [2, 5, 8, 11] (four evenly spaced of 12).
_base_ = ["./dpt_probe_vit_base.py", "./dinov3_nyu.py"]
train_dataloader = _base_.dinov3_dense.train_dataloader
val_dataloader = test_dataloader = _base_.dinov3_dense.val_dataloader
model = dict(
    _base_.dinov3_dense.model, backbone=dict(img_size=512, out_indices=(2, 5, 8, 11)), decode_head=dict(patch_size=16)
)
# DINOv3's storage tokens (reg_token) as cls_token: full lr, no weight decay (the mask token is frozen)
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={"reg_token": dict(decay_mult=0.0)}))
