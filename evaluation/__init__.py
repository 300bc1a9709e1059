"""Measuring the codec: quality metrics, the conventional anchors (x264, x265, SVT-AV1),
rate-distortion evaluation and reports, BD-rates, speed, and model statistics."""
