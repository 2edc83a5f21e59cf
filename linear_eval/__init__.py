"""ImageNet linear probing and kNN (DINOv2 protocol), plus the feature extraction the evals share."""
