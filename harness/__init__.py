"""segrepro's harness: config, models, data, training, inference, metrics, benchmark, CLI.

Importing the package is cheap (no torch): ``segrepro --help`` must not pay for it."""
import os


def _cuda_device_present() -> bool:
    """Whether a CUDA device is visible, asked of NVML: it needs neither torch nor a CUDA context
    (the check torch itself makes with PYTORCH_NVML_BASED_CUDA_CHECK=1, safe before a fork)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver, no library: no GPU
        return False
    try:
        return pynvml.nvmlDeviceGetCount() > 0
    finally:
        pynvml.nvmlShutdown()


# Without a GPU the Triton kernels run under Triton's interpreter. Triton decides this when its
# own language modules are first imported (timm imports them early), so the variable must be
# set before anything imports triton, not only before the kernels are defined.
if "TRITON_INTERPRET" not in os.environ and not _cuda_device_present():
    os.environ["TRITON_INTERPRET"] = "1"
