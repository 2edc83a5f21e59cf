# NYU-Depth V2 at 512 crops for a DINOv3-layout backbone (a 32x32 grid of patch 16): the Proteus protocol
# (PROTOCOLS E) at the crop DINOv3 evaluates its dense tasks at, not a DINOv3 protocol. The `*_dinov3_layout.py`
# configs inherit the DINOv2-layout config of their head and size and take from here what depends on the crop:
# nyu_base.py's pipelines and windows at 512 (random crop 512, test resize to short side 512, slide stride 1/4 of the
# crop: 128). One key, `dinov3_layout`, so this file sits beside any NYU config in `_base_` (bases must not share a
# key).
crop = (512, 512)
meta_keys = ("img_path", "depth_map_path", "ori_shape", "img_shape", "pad_shape", "scale_factor", "flip",
             "flip_direction", "category_id")  # fmt: skip
dinov3_layout = dict(
    protocol_suffix=", DINOv3 layout (512 crops, blocks at even intervals)",
    train_dataloader=dict(
        dataset=dict(
            pipeline=[
                dict(type="LoadImageFromFile"),
                dict(type="LoadDepthAnnotation", depth_rescale_factor=1e-3),  # PNG millimetres -> metres
                dict(type="RandomDepthMix", prob=0.25),
                dict(type="RandomFlip", prob=0.5),
                dict(type="RandomResize", scale=(770, 512), ratio_range=(0.8, 1.5), keep_ratio=True),
                dict(type="RandomCrop", crop_size=crop),
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
        )
    ),
    val_dataloader=dict(
        dataset=dict(
            pipeline=[
                dict(type="LoadImageFromFile"),
                dict(type="Resize", scale=(2044, 512), keep_ratio=True),
                dict(type="LoadDepthAnnotation", depth_rescale_factor=1e-3),
                dict(type="PackSegInputs", meta_keys=meta_keys),
            ]
        )
    ),
    model=dict(data_preprocessor=dict(size=crop), test_cfg=dict(mode="slide_flip", crop_size=crop, stride=(128, 128))),
)
del crop, meta_keys
