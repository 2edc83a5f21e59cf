# ADE20K linear probe, DINOv3-layout ViT-S/16 (PROTOCOLS G): linear_vit_small.py at DINOv3's dense setting,
# 512 crops (dinov3_ade20k.py) and blocks [2, 5, 8, 11] (four evenly spaced of 12).
_base_ = ["./linear_vit_small.py", "./dinov3_ade20k.py"]
train_dataloader = _base_.dinov3_dense.train_dataloader
val_dataloader = test_dataloader = _base_.dinov3_dense.val_dataloader
model = dict(_base_.dinov3_dense.model, backbone=dict(img_size=512, out_indices=(2, 5, 8, 11)))
