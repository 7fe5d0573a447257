"""CUDA C compiled at run time with NVRTC and launched through the CUDA driver API, by ctypes:
no toolkit and no extra package (torch's CUDA wheels ship libnvrtc; the driver ships libcuda).
Compiled images are cached on disk per source, architecture and NVRTC version."""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import hashlib
import os
import site
import threading
from pathlib import Path

from appliance.errors import ApplianceError


class CudaRtcError(ApplianceError):
    """NVRTC or the CUDA driver is missing, or compiling or launching a kernel failed."""


def _find_nvrtc() -> ctypes.CDLL:
    roots = [*site.getsitepackages(), site.getusersitepackages()]
    names = []
    for root in roots:
        for pattern in ("nvidia/*/lib/libnvrtc.so*", "nvidia/*/*/lib/libnvrtc.so*"):
            names += sorted(n for n in glob.glob(os.path.join(root, pattern)) if ".alt." not in n)
    found = ctypes.util.find_library("nvrtc")
    names += [found] if found else []
    names += ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"]
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise CudaRtcError("NVRTC (libnvrtc) was not found: install torch's CUDA build")


def _check(lib: str, status: int, what: str) -> None:
    if status != 0:
        raise CudaRtcError(f"{lib} failed in {what} (status {status})")


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "appliance" / "kernels"


def compile_cubin(source: str, arch: int) -> bytes:
    """A CUBIN for sm_<arch> (e.g. 90), from the disk cache when it has one."""
    nvrtc = _find_nvrtc()
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check("NVRTC", nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "version")
    digest = hashlib.sha256(f"{source}|{arch}|{major.value}.{minor.value}".encode()).hexdigest()
    cached = _cache_dir() / f"{digest[:32]}.cubin"
    try:
        return cached.read_bytes()
    except OSError:
        pass
    prog = ctypes.c_void_p()
    _check(
        "NVRTC",
        nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernels.cu", 0, None, None),
        "create",
    )
    try:
        opts = [f"--gpu-architecture=sm_{arch}".encode()]
        status = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        if status != 0:
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise CudaRtcError(f"NVRTC could not compile the kernels:\n{log.value.decode()}")
        size = ctypes.c_size_t()
        _check("NVRTC", nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "CUBIN size")
        image = ctypes.create_string_buffer(size.value)
        _check("NVRTC", nvrtc.nvrtcGetCUBIN(prog, image), "CUBIN")
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    try:  # a cache that cannot be written only costs the next start a compile
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(image.raw)
        os.replace(tmp, cached)
    except OSError:
        pass
    return image.raw


class CudaModule:
    """Kernels of one source, loaded into the device's primary context (the one torch uses)."""

    def __init__(self, source: str, device_index: int, arch: int):
        self._cuda = ctypes.CDLL("libcuda.so.1")
        # Launches go through a handle that keeps the GIL: a launch takes microseconds, and
        # releasing and retaking the GIL around it costs more when 16 loader threads contend.
        self._cuda_gil = ctypes.PyDLL("libcuda.so.1")
        self._local = threading.local()
        self._device_index = device_index
        self._ensure_context()
        image = compile_cubin(source, arch)
        self._module = ctypes.c_void_p()
        _check(
            "CUDA",
            self._cuda.cuModuleLoadData(ctypes.byref(self._module), image),
            "loading the kernels",
        )
        self._functions: dict[str, ctypes.c_void_p] = {}
        self._lock = threading.Lock()

    def _ensure_context(self) -> None:
        """Make the device's primary context current in this thread (a thread torch has not
        used yet has none)."""
        current = ctypes.c_void_p()
        _check("CUDA", self._cuda.cuCtxGetCurrent(ctypes.byref(current)), "cuCtxGetCurrent")
        if current.value:
            return
        _check("CUDA", self._cuda.cuInit(0), "cuInit")
        device, ctx = ctypes.c_int(), ctypes.c_void_p()
        _check("CUDA", self._cuda.cuDeviceGet(ctypes.byref(device), self._device_index), "device")
        _check("CUDA", self._cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device), "context")
        _check("CUDA", self._cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")

    def _function(self, name: str) -> ctypes.c_void_p:
        with self._lock:
            if name not in self._functions:
                fn = ctypes.c_void_p()
                _check(
                    "CUDA",
                    self._cuda.cuModuleGetFunction(ctypes.byref(fn), self._module, name.encode()),
                    f"finding kernel {name}",
                )
                self._functions[name] = fn
            return self._functions[name]

    def launch(
        self,
        name: str,
        grid: tuple[int, int, int],
        block: int,
        args: list[ctypes._SimpleCData],
        stream: int,
    ) -> None:
        """Queue kernel `name` on `stream` (a CUstream handle, e.g. torch's `.cuda_stream`)."""
        if not getattr(self._local, "has_context", False):
            self._ensure_context()
            self._local.has_context = True
        params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        status = self._cuda_gil.cuLaunchKernel(
            self._function(name),
            ctypes.c_uint(grid[0]),
            ctypes.c_uint(grid[1]),
            ctypes.c_uint(grid[2]),
            ctypes.c_uint(block),
            ctypes.c_uint(1),
            ctypes.c_uint(1),
            ctypes.c_uint(0),
            ctypes.c_void_p(stream),
            params,
            None,
        )
        _check("CUDA", status, f"launching {name}")
