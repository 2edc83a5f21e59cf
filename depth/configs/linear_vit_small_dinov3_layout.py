# NYU 1x1 probe, DINOv3-layout ViT-S/16: the Proteus protocol of linear_vit_small.py (PROTOCOLS E),
# run at 512 crops (dinov3_layout_nyu.py) on blocks [2, 5, 8, 11], the four evenly spaced of 12
# (DINOv3's FOUR_EVEN_INTERVALS). Not DINOv3's own evaluation protocol: the head, schedule and data are Proteus's.
_base_ = ["./linear_vit_small.py", "./dinov3_layout_nyu.py"]
protocol_name = _base_.protocol_name + _base_.dinov3_layout.protocol_suffix
train_dataloader = _base_.dinov3_layout.train_dataloader
val_dataloader = test_dataloader = _base_.dinov3_layout.val_dataloader
model = dict(_base_.dinov3_layout.model, backbone=dict(img_size=512, out_indices=(2, 5, 8, 11)))
