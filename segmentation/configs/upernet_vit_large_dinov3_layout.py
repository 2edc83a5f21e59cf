# ADE20K UperNet fine-tuning, DINOv3-layout ViT-L/16: the Proteus protocol of upernet_vit_large.py (PROTOCOLS D),
# run at 512 crops (dinov3_layout_ade20k.py) on blocks [4, 11, 17, 23], the four evenly spaced of 24
# (DINOv3's FOUR_EVEN_INTERVALS). Not DINOv3's own evaluation protocol: the head, schedule and data are Proteus's.
_base_ = ["./upernet_vit_large.py", "./dinov3_layout_ade20k.py"]
protocol_name = _base_.protocol_name + _base_.dinov3_layout.protocol_suffix
train_dataloader = _base_.dinov3_layout.train_dataloader
val_dataloader = test_dataloader = _base_.dinov3_layout.val_dataloader
model = dict(_base_.dinov3_layout.model, backbone=dict(img_size=512, out_indices=(4, 11, 17, 23)))
