# DINOv3's ADE20K linear protocol, one config for every ViT (docs/protocols.md, "DINOv3's ADE20K linear protocol"),
# as facebookresearch/dinov3's dinov3/eval/segmentation sets it: configs/config-ade20k-linear-training.yaml, config.py's
# defaults, models/__init__.py, models/heads/linear_head.py, train.py, transforms.py, schedulers.py, inference.py.
# The frozen backbone's last block through its final norm; Dropout2d 0.1, BN, 1x1 conv to 150 classes (BNLinearHead,
# its width filled in from the backbone by the runner); AdamW lr 1e-3, betas (0.9, 0.999), wd 1e-3 on every head
# parameter, no gradient clipping, fp32; 40k iterations of global batch 16 (DINOv3: 8 GPUs x 2); warmup 1500 from
# 1e-6 then a cosine to 0 over the run (DINOv3SegWarmupOneCycleLR); 512 crops; test at short side 512 in 512 windows,
# stride 341. DINOv3 evaluates every 5000 iterations and reports the best: our "mIoU best on test".
_base_ = ["./ade20k_base.py"]
custom_imports = dict(imports=["segmentation.mmseg_ext", "segmentation.dinov3_protocol"], allow_failed_imports=False)
protocol_name = "DINOv3 ADE20K linear"

crop_size = (512, 512)
short_side = 512
# DINOv3 resizes by the short side alone; mmcv's keep-ratio resize also bounds the long side: a bound that never
# binds (aspect ratios up to 64)
long_side_bound = 64 * short_side
iters = 40000
warmup_iters = 1500
# DINOv3's 8 GPUs x 2 (SyncBN over all 16): the batch a launcher spreads over its n GPUs, 16 / n each
# (train_dataloader.batch_size below is DINOv3's per-GPU 2, the batch of a run on 8)
global_batch = 16

# decoded by PIL without EXIF rotation and resized by PIL (bilinear), as DINOv3's dataset and transforms do
load_image = dict(type="LoadImageFromFile", imdecode_backend="pillow", color_type="color_ignore_orientation")
train_pipeline = [
    load_image,
    dict(type="LoadAnnotations", reduce_zero_label=True),
    dict(
        type="RandomResize",
        scale=(long_side_bound, short_side),
        ratio_range=(0.5, 2.0),
        resize_type="DINOv3Resize",  # the label by torch's nearest rule, as DINOv3's
        keep_ratio=True,
        backend="pillow",
        interpolation="bilinear",
    ),
    dict(type="RandomCrop", crop_size=crop_size, cat_max_ratio=0.75),
    dict(type="RandomFlip", prob=0.5),
    # mmseg's brightness and contrast, DINOv3's (torchvision's) saturation and hue over the whole circle
    dict(
        type="DINOv3PhotoMetricDistortion",
        brightness_delta=32,
        contrast_range=(0.5, 1.5),
        saturation_range=(0.5, 1.5),
        hue_range=(-0.5, 0.5),
    ),
    dict(type="PackSegInputs"),
]
test_pipeline = [
    load_image,
    dict(
        type="Resize",
        scale=(long_side_bound, short_side),
        keep_ratio=True,
        backend="pillow",
        interpolation="bilinear",
    ),
    dict(type="LoadAnnotations", reduce_zero_label=True),  # after the resize: scored at the original size
    dict(type="PackSegInputs"),
]
train_dataloader = dict(batch_size=2, dataset=dict(pipeline=train_pipeline))  # per GPU
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

# crops smaller than 512 padded after normalisation, the image with 0, the label with 255 (ignored), as DINOv3's
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(img_size=512, out_indices=(-1,), final_norm=True, frozen=True),  # -1: the last block
    decode_head=dict(
        type="BNLinearHead",
        in_channels=None,  # the backbone's width
        in_index=0,
        channels=None,  # = in_channels
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=dict(type="SyncBN", requires_grad=True),  # plain BN when not distributed
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),  # mean over all pixels
    ),
    test_cfg=dict(mode="slide", crop_size=crop_size, stride=(341, 341)),
)
optim_wrapper = dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-3))
param_scheduler = [
    dict(
        type="DINOv3SegWarmupOneCycleLR",
        total_iters=iters,
        warmup_iters=warmup_iters,
        warmup_ratio=1e-6,
        by_epoch=False,
        begin=0,
        end=iters,
    )
]
train_cfg = dict(max_iters=iters, val_interval=5000)
default_hooks = dict(checkpoint=dict(interval=5000, save_best="mIoU", rule="greater"))
