"""XDistillation (Alharbi, Vu, Thai; IEEE BigData 2021): explanations distilled through a CAE.

The teacher's explanations (KernelSHAP, LIME or GradCAM over SLIC superpixels) train a small
convolutional autoencoder (`cae`) to map an image to the teacher's superpixel explanation; the frozen
CAE's output is concatenated with the student CNN's features before its classifier (`student`).
`metrics` compares teacher and student explanations; `run.run` is the whole pipeline from a config
(`config`). See docs/xdistill.md for the method and every choice the paper leaves open.
"""

from e2kd_fast.xdistill.cae import LARGE_CAE_PARAMS, SMALL_CAE_PARAMS, build_cae, count_parameters, large_cae, small_cae
from e2kd_fast.xdistill.explainers import explain_superpixels, gradcam_superpixels, kernel_shap, lime
from e2kd_fast.xdistill.metrics import explanation_mse, topk_sign_overlap
from e2kd_fast.xdistill.student import SmallCNN, XDistillStudent, xdistill_loss
from e2kd_fast.xdistill.superpixels import broadcast_segments, slic_segments, superpixel_map, superpixel_sums

__all__ = [
    "LARGE_CAE_PARAMS",
    "SMALL_CAE_PARAMS",
    "SmallCNN",
    "XDistillStudent",
    "broadcast_segments",
    "build_cae",
    "count_parameters",
    "explain_superpixels",
    "explanation_mse",
    "gradcam_superpixels",
    "kernel_shap",
    "large_cae",
    "lime",
    "slic_segments",
    "small_cae",
    "superpixel_map",
    "superpixel_sums",
    "topk_sign_overlap",
    "xdistill_loss",
]
