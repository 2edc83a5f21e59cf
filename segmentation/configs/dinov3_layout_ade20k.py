# ADE20K at 512 crops for a DINOv3-layout backbone (a 32x32 grid of patch 16): the Proteus protocol (PROTOCOLS D)
# with the crop DINOv3 evaluates ADE20K at, not DINOv3's protocol (dinov3_linear.py is that). The
# `*_dinov3_layout.py` configs inherit the DINOv2-layout config of their head and size and take from here what depends
# on the crop: ade20k_base.py's pipelines and windows at 512 (resize to short side 512, long side at most 4 x 512;
# slide stride 2/3 of the crop, 341, as mmseg's 512 configs). One key, `dinov3_layout`, so this file sits beside any
# ADE20K config in `_base_` (bases must not share a key).
crop = (512, 512)
dinov3_layout = dict(
    protocol_suffix=", DINOv3 layout (512 crops, blocks at even intervals)",
    train_dataloader=dict(
        dataset=dict(
            pipeline=[
                dict(type="LoadImageFromFile"),
                dict(type="LoadAnnotations", reduce_zero_label=True),
                dict(type="RandomResize", scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
                dict(type="RandomCrop", crop_size=crop, cat_max_ratio=0.75),
                dict(type="RandomFlip", prob=0.5),
                dict(type="PhotoMetricDistortion"),
                dict(type="PackSegInputs"),
            ]
        )
    ),
    val_dataloader=dict(
        dataset=dict(
            pipeline=[
                dict(type="LoadImageFromFile"),
                dict(type="Resize", scale=(2048, 512), keep_ratio=True),
                dict(type="LoadAnnotations", reduce_zero_label=True),
                dict(type="PackSegInputs"),
            ]
        )
    ),
    model=dict(data_preprocessor=dict(size=crop), test_cfg=dict(mode="slide", crop_size=crop, stride=(341, 341))),
)
del crop
