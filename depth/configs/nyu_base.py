# NYU-Depth V2 at 518 (PROTOCOLS E): the pipelines, loss, windows and schedule shared by every Proteus NYU config
# (the data and metric: nyu_data.py).
_base_ = ["./nyu_data.py"]
protocol_name = "Proteus NYU-Depth V2"  # results.json's protocol.name

crop_size = (518, 518)
meta_keys = {{_base_.meta_keys}}  # nyu_data.py's, for the pipelines below
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadDepthAnnotation", depth_rescale_factor=1e-3),  # PNG millimetres -> metres
    dict(type="RandomDepthMix", prob=0.25),
    dict(type="RandomFlip", prob=0.5),
    dict(type="RandomResize", scale=(770, 512), ratio_range=(0.8, 1.5), keep_ratio=True),
    dict(type="RandomCrop", crop_size=crop_size),
    dict(
        type="Albu",
        transforms=[
            dict(type="RandomBrightnessContrast"),
            dict(type="RandomGamma"),
            dict(type="HueSaturationValue"),
        ],
    ),
    dict(type="PackSegInputs", meta_keys=meta_keys),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(2044, 518), keep_ratio=True),
    dict(type="LoadDepthAnnotation", depth_rescale_factor=1e-3),
    dict(type="PackSegInputs", meta_keys=meta_keys),
]
train_dataloader = dict(batch_size=4, dataset=dict(pipeline=train_pipeline))  # batch per GPU
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

data_preprocessor = dict(
    type="SegDataPreProcessor",
    mean=[127.5, 127.5, 127.5],
    std=[127.5, 127.5, 127.5],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=0,
    size=crop_size,
)
model = dict(
    type="DepthEstimator",
    data_preprocessor=data_preprocessor,
    decode_head=dict(
        num_classes=1,
        out_channels=1,
        align_corners=False,
        loss_decode=dict(type="SiLogLoss", eps=1e-6, loss_weight=1.0),
    ),
    train_cfg=dict(),
    # sliding 518 windows with stride 129, each averaged with its flipped prediction
    test_cfg=dict(mode="slide_flip", crop_size=crop_size, stride=(129, 129)),
)

iters = 25000
warmup_iters = 1500
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=warmup_iters),
    dict(type="PolyLR", power=1.0, eta_min=0.0, by_epoch=False, begin=warmup_iters, end=iters),
]
# as the reference: evaluated on the test split every 1000 iterations, checkpoints every 2000, the
# best RMSE kept (`save_best`; the paper's figure is that best-of-25, results.json names it)
train_cfg = dict(max_iters=iters, val_interval=1000)
default_hooks = dict(checkpoint=dict(interval=2000, save_best="rmse", rule="less"))
visualizer = dict(alpha=1.0)
