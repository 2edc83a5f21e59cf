# ADE20K linear probe, DINOv3-layout ViT-L/16 (PROTOCOLS G): linear_vit_large.py at DINOv3's dense setting,
# 512 crops (dinov3_ade20k.py) and blocks [4, 11, 17, 23] (four evenly spaced of 24).
_base_ = ["./linear_vit_large.py", "./dinov3_ade20k.py"]
train_dataloader = _base_.dinov3_dense.train_dataloader
val_dataloader = test_dataloader = _base_.dinov3_dense.val_dataloader
model = dict(_base_.dinov3_dense.model, backbone=dict(img_size=512, out_indices=(4, 11, 17, 23)))
