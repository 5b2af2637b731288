"""Running models in onnxruntime on the CPU."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from quantkit.errors import InputError, UnsupportedModelError, first_line

# protobuf cannot serialize a model of 2 GiB or more; stay well below with a margin.
INLINE_LIMIT = 1_500_000_000
# The placement's sessions (sensitivity, candidates) run one intra-op thread each, PARALLEL_RUNS runs at a
# time: their figures then do not depend on the machine's core count, and on a busy machine single-threaded
# runs side by side lose far less than one run whose threads wait for each other.
PLACEMENT_THREADS = 1
PARALLEL_RUNS = 2

T = TypeVar("T")
_pool: ThreadPoolExecutor | None = None


def run_all(jobs: list[Callable[[], T]]) -> list[T]:
    """The jobs' results in order, up to PARALLEL_RUNS at a time (onnxruntime releases the GIL while
    it runs); the first exception is raised once every job has finished."""
    global _pool
    if len(jobs) <= 1:
        return [job() for job in jobs]
    if _pool is None:
        _pool = ThreadPoolExecutor(PARALLEL_RUNS, thread_name_prefix="quantkit-run")
    futures = [_pool.submit(job) for job in jobs]
    errors = [f.exception() for f in futures]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return [f.result() for f in futures]


def tensor_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


@contextlib.contextmanager
def unpublished(model: ir.Model) -> Iterator[None]:
    """Serialize without the shapes of intermediate tensors (ONNX `value_info`); they are restored after.

    quantkit infers them for its own passes, unifying unknown dimensions across the graph, but written
    into a model they change what onnxruntime fuses: with the symbolic sequence dimension of two residual
    inputs proven equal it turns Add + LayerNormalization into SkipLayerNormalization, which its CPU
    kernel runs 5-6x slower (benchmarks/ln_fusion.py). Written without them, onnxruntime infers the
    shapes itself, as it does for the user's original model. Graph inputs and outputs keep theirs."""
    stashed: list[tuple[ir.Value, ir.Shape | None]] = []
    for graph in model.graphs():
        boundary = {id(v) for v in (*graph.inputs, *graph.outputs)}
        for node in graph:
            for out in node.outputs:
                if id(out) not in boundary and out.shape is not None:
                    stashed.append((out, out.shape))
                    out.shape = None
    try:
        yield
    finally:
        for value, shape in stashed:
            value.shape = shape


def save(model: ir.Model, path: Path) -> None:
    """Save, moving weights to `<name>.data` beside the file when the model is too big to inline."""
    path = Path(path)
    with unpublished(model):
        if tensor_bytes(model) > INLINE_LIMIT or _references_files(model):
            # mapped weights are written out too: their old location is relative to another folder
            ir.save(model, path, external_data=path.name + ".data")
        else:
            ir.save(model, path)


def _references_files(model: ir.Model) -> bool:
    """Weights still memory-mapped from an external data file: serialized to bytes they would
    point at a path onnxruntime resolves against its working directory, not the model's."""
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def session_options(threads: int | None = None, lean: bool = False, mapped: bool = False) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if lean:  # many small sessions alive at once: no arena or memory pattern kept per session
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
    if mapped:  # float weights read straight from the mapped data file: no prepacked second copy, no arena
        so.add_session_config_entry("session.disable_prepacking", "1")
        so.enable_cpu_mem_arena = False
    if threads:
        so.intra_op_num_threads = threads
    return so


def session(model: ir.Model | Path, workdir: Path, tag: str = "model", threads: int | None = None,
            lean: bool = False, mapped: bool = False):
    """An InferenceSession for an in-memory model or for a file on disk. A model whose weights are
    still in one external data folder is serialized without them and onnxruntime reads them from
    that folder (never from the working directory); other large models are saved to workdir."""
    from quantkit.load import external

    try:
        options = session_options(threads, lean, mapped)
        source: str | bytes
        if isinstance(model, (str, os.PathLike)):
            source = str(model)
        elif _references_files(model) and len(folders := external.external_folders(model)) == 1 \
                and external.in_memory_bytes(model) <= INLINE_LIMIT:
            options = session_options(threads, lean, mapped=True)
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(folders.pop()))
            source = _serialized(model)
        elif tensor_bytes(model) > INLINE_LIMIT or _references_files(model):
            folder = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=workdir))
            external.write_model(model.clone(), folder / f"{tag}.onnx")
            source = str(folder / f"{tag}.onnx")
        else:
            source, arrays = _without_weights(model)
            if arrays:
                options.add_external_initializers(list(arrays), list(arrays.values()))
        return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises several unrelated exception types
        raise UnsupportedModelError(f"onnxruntime cannot load the {tag} model: {first_line(e)}") from e


def _serialized(model: ir.Model) -> bytes:
    with unpublished(model):
        return ir.serde.serialize_model(model).SerializeToString()


# weights handed to onnxruntime as arrays rather than serialized: the numeric types whose numpy array is
# their ONNX storage, from this size up (shape operands stay inline, where shape inference reads them)
HANDED_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.INT8,
                          ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32,
                          ir.DataType.UINT32, ir.DataType.INT64, ir.DataType.UINT64, ir.DataType.BOOL})
HANDED_MIN_BYTES = 1024
_HANDED = "quantkit-in-memory"  # the placeholder location; onnxruntime never reads it


def _without_weights(model: ir.Model) -> tuple[bytes, dict[str, ort.OrtValue]]:
    """The model serialized with its larger in-memory weights left out (marked external), and those
    weights as OrtValues for SessionOptions.add_external_initializers, which puts them in place before
    onnxruntime optimizes the graph: the same session, without copying every weight through protobuf
    twice (MiniLM's 86 MB: 0.22 s -> 0.09 s per session, benchmarks/session_build.py). The model is left as it was."""
    # read, and by top-level nodes only: onnxruntime drops an initializer nothing reads before it puts the
    # handed ones in place, and cannot replace one an If/Loop body reads (either fails the load)
    handed: list[tuple[ir.Value, ir.TensorProtocol]] = [
        (v, t) for v in model.graph.initializers.values()
        if (t := v.const_value) is not None and not isinstance(t, ir.ExternalTensor)
        and t.dtype in HANDED_TYPES and t.nbytes >= HANDED_MIN_BYTES
        and (uses := list(v.uses())) and all(u.node.graph is model.graph for u in uses)]
    arrays: dict[str, ort.OrtValue] = {}
    try:
        for value, tensor in handed:
            assert value.name is not None
            array = np.ascontiguousarray(tensor.numpy())
            arrays[value.name] = ort.OrtValue.ortvalue_from_numpy(array)
            value.const_value = ir.ExternalTensor(_HANDED, 0, array.nbytes, tensor.dtype, shape=ir.Shape(array.shape),
                                                  name=value.name)
        return _serialized(model), arrays
    finally:
        for value, tensor in handed:
            value.const_value = tensor


def run(sess, names: list[str] | None, feed: dict[str, np.ndarray], what: str) -> list[np.ndarray]:
    """sess.run, with onnxruntime's errors on user data (an index out of range, a shape the model
    cannot take) turned into a one-line InputError naming what was being run."""
    try:
        return sess.run(names, feed)
    except Exception as e:  # onnxruntime's Fail / InvalidArgument / RuntimeException
        if not type(e).__module__.startswith("onnxruntime"):
            raise
        raise InputError(f"onnxruntime could not run the model on {what}: {first_line(e)}") from e
