# DINOv3's own NYU linear depth protocol, as its code runs it (facebookresearch/dinov3 at 6876159:
# dinov3/eval/depth/configs/config-nyu.yaml with config.py's defaults, models/, loss.py, schedulers.py,
# transforms.py, train.py, eval.py). Any ViT size: the runner fills in the head's width.
# What mmseg cannot express, and the differences left: docs/protocols.md, E2.
# the splits and the metric: nyu_data.py (DINOv3's metric too: gt in (0.001, 10) m in the Eigen crop, per image)
_base_ = ["./nyu_data.py"]
custom_imports = dict(imports=["segmentation.mmseg_ext", "segmentation.dinov3_protocol"], allow_failed_imports=False)
protocol_name = "DINOv3 NYU linear"  # results.json's protocol.name

crop = (416, 544)  # (h, w), random crops at the native 480x640 (no resize)
meta_keys = {{_base_.meta_keys}}  # nyu_data.py's, for the pipelines below
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadDepthAnnotation", depth_rescale_factor=1e-3),  # PNG millimetres -> metres (/ 1000)
    dict(type="BoxCrop", box=(43, 45, 608, 472), reference=(480, 640)),  # fixed_crop NYU: 565 x 427
    # rotation_angle 2.5 (config.py) with probability 0.5; bilinear image, nearest depth, 0 (ignored) outside
    dict(type="RandomRotate", prob=0.5, degree=2.5, pad_val=0, seg_pad_val=0),
    dict(type="RandomFlip", prob=0.5),
    dict(type="RandomCrop", crop_size=crop),
    dict(type="DepthColorAug", prob=0.5, gamma_range=(0.9, 1.1), brightness_range=(0.75, 1.25), color_range=(0.9, 1.1)),
    dict(type="PackSegInputs", meta_keys=meta_keys),
]
# the full image (fixed_crop FULL), nothing resized
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadDepthAnnotation", depth_rescale_factor=1e-3),
    dict(type="PackSegInputs", meta_keys=meta_keys),
]
# DINOv3's 8 GPUs x 2 (the loss and SyncBN over all 16): the batch a launcher spreads over its n GPUs, 16 / n each
global_batch = 16
train_dataloader = dict(
    batch_size=2,  # per GPU on DINOv3's 8
    dataset=dict(pipeline=train_pipeline),
)
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

model = dict(
    type="DepthEstimator",
    data_preprocessor=dict(
        type="SegDataPreProcessor",
        mean=[123.675, 116.28, 103.53],  # ImageNet's (0.485, 0.456, 0.406) x 255
        std=[58.395, 57.12, 57.375],  # (0.229, 0.224, 0.225) x 255
        bgr_to_rgb=True,
        pad_val=0,
        seg_pad_val=0,
        size=crop,
    ),
    # the last block (-1, whatever the depth), through the final norm, patch tokens only
    # (use_cls_token False), frozen; inputs zero-padded to whole patches around the centre (CENTER_PADDING)
    backbone=dict(frozen=True, out_indices=(-1,), final_norm=True, with_cls_token=False, center_pad=True),
    decode_head=dict(
        type="DepthBinsHead",
        in_channels=None,  # the backbone's width
        in_index=0,
        n_bins=256,
        min_depth=1e-3,
        max_depth=10.0,
        norm_cfg=dict(type="SyncBN", requires_grad=True),
        align_corners=False,
        loss_decode=dict(type="WarmupSigLoss", eps=1e-3, mean_weight=0.15, warm_iter=100, loss_weight=1.0),
    ),
    train_cfg=dict(),
    # use_tta: each image whole, averaged with its flipped prediction. mmseg's whole mode has no flip:
    # slide_flip with one window as large as NYU's 480x640 images is the same computation
    test_cfg=dict(mode="slide_flip", crop_size=(480, 640), stride=(480, 640)),
)

iters = 38400
warmup = 12800
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=3e-4, betas=(0.9, 0.99), weight_decay=1e-4),
    clip_grad=dict(max_norm=35, norm_type=2),
)
# dinov3/eval/depth/schedulers.py's WarmupOneCycleLR (final_div_factor 1000, div_factor 25, cosine); it also
# drives Adam's beta1 (0 in the warmup, then 0.85 -> 0.95), so the 0.9 above is never used, there as here
param_scheduler = [
    dict(type="DINOv3DepthWarmupOneCycleLR", total_steps=iters, warmup_steps=warmup, div_factor=25.0,
         final_div_factor=1000.0, by_epoch=False, begin=0, end=iters),
    dict(type="DINOv3DepthWarmupOneCycleMomentum", total_steps=iters, warmup_steps=warmup, base_momentum=0.85,
         max_momentum=0.95, by_epoch=False, begin=0, end=iters),
]  # fmt: skip
# evaluated and checkpointed every 1600 iterations (eval_interval); the reported figure is the final model's
# (no best-of selection), with flip
train_cfg = dict(max_iters=iters, val_interval=1600)
default_hooks = dict(checkpoint=dict(interval=1600))
randomness = dict(seed=321, diff_rank_seed=True)  # seed + rank
visualizer = dict(alpha=1.0)
