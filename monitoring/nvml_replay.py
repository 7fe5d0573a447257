"""Record what NVML answers on a real GPU machine, and replay it where there is no GPU, so the
NVML code (monitoring/nvml.py) is tested against real answers.

    python -m appliance.monitoring.nvml_replay capture out.json   # on a GPU machine

A capture maps each call, e.g. ``nvmlDeviceGetMemoryInfo(h0)``, to its answer: numbers and
strings as they are, NVML structures as dicts of their fields, NVML errors as their code.
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from appliance.monitoring.nvml import NvmlReader

_ERROR = "__nvml_error__"
_SEQUENCE = "__sequence__"


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, ctypes.Structure):
        return {name: _jsonable(getattr(value, name)) for name, *_ in value._fields_}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, ctypes.Array):
        return [_jsonable(v) for v in value]
    return value


class _Handle:
    """A device handle, named by its index so that captured keys are stable."""

    def __init__(self, name: str, real: Any = None):
        self.name, self.real = name, real


class RecordingNvml:
    """Wraps the real pynvml module; every nvml* call's answer is kept in `calls`."""

    def __init__(self, real: Any):
        self._real = real
        self.calls: dict[str, Any] = {}
        self._handles: dict[int, _Handle] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if not (name.startswith("nvml") and callable(attr)):
            return attr

        def call(*args):
            real_args = [a.real if isinstance(a, _Handle) else a for a in args]
            key = _key(name, args)
            try:
                result = attr(*real_args)
            except self._real.NVMLError as exc:
                self.calls[key] = {_ERROR: exc.value}
                raise
            if name in ("nvmlDeviceGetHandleByIndex", "nvmlEventSetCreate"):
                wrapped = _Handle(f"h{args[0]}" if args else "events", result)
                self.calls[key] = {"handle": wrapped.name}
                return wrapped
            recorded = _jsonable(result)
            if name == "nvmlEventSetWait_v2":
                uuid = self._real.nvmlDeviceGetUUID(result.device)
                recorded["device"] = {"uuid": _jsonable(uuid)}
            self.calls[key] = recorded
            return result

        return call


def _key(name: str, args) -> str:
    shown = [a.name if isinstance(a, _Handle) else repr(a) for a in args]
    return f"{name}({','.join(shown)})"


def _namespace(value: Any) -> Any:
    if isinstance(value, dict):
        return SimpleNamespace(**{k: _namespace(v) for k, v in value.items()})
    return value


class ReplayNvml:
    """Answers nvml* calls from a capture; constants and NVMLError come from pynvml itself."""

    def __init__(self, calls: dict[str, Any], real: Any = None):
        if real is None:
            import pynvml as real
        self._real = real
        self.calls = calls
        self.NVMLError = real.NVMLError

    @classmethod
    def from_file(cls, path: Path) -> ReplayNvml:
        return cls(json.loads(Path(path).read_text())["calls"])

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._real, name)
        if not (name.startswith("nvml") and callable(real)):
            return real  # constants (NVML_*, nvmlEventType*) and NVMLError
        if name in ("nvmlInit", "nvmlShutdown"):
            return _noop

        def call(*args):
            key = _key(name, args)
            if key not in self.calls:
                # Not captured: the GPU was not asked this; answer like an unsupported query.
                raise self._real.NVMLError(self._real.NVML_ERROR_NOT_SUPPORTED)
            answer = self.calls[key]
            if isinstance(answer, dict) and _SEQUENCE in answer:
                # Answers in turn (e.g. one event, then a timeout); the last one repeats.
                sequence = answer[_SEQUENCE]
                answer = sequence.pop(0) if len(sequence) > 1 else sequence[0]
            if isinstance(answer, dict) and _ERROR in answer:
                raise self._real.NVMLError(answer[_ERROR])
            if isinstance(answer, dict) and "handle" in answer:
                return _Handle(answer["handle"])
            return _namespace(answer)

        return call

    def nvmlDeviceGetUUID(self, handle):
        if isinstance(handle, SimpleNamespace):  # the device of a replayed event
            return handle.uuid
        return self.__getattr__("nvmlDeviceGetUUID")(handle)


def _noop(*_args) -> None:
    return None


def capture(out: Path) -> dict[str, Any]:
    """Read every GPU once through a recording NVML; write the calls and the readings."""
    import datetime as dt
    import socket
    import time
    from dataclasses import asdict

    import pynvml

    recorder = RecordingNvml(pynvml)
    reader = NvmlReader(recorder).open()
    try:
        readings = reader.read()
        xid_events = reader.xid_events_supported
        started = time.perf_counter()
        for _ in range(20):
            reader.read()
        read_ms = (time.perf_counter() - started) / 20 * 1000
    finally:
        reader.close()
    document = {
        "host": socket.gethostname(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "driver": _jsonable(pynvml.nvmlSystemGetDriverVersion()) if _init(pynvml) else None,
        "xid_events_supported": xid_events,
        "read_ms": round(read_ms, 3),
        "readings": [asdict(r) for r in readings],
        "calls": recorder.calls,
    }
    out.write_text(json.dumps(document, indent=1, sort_keys=True))
    return document


def _init(pynvml) -> bool:
    try:
        pynvml.nvmlInit()
        return True
    except pynvml.NVMLError:
        return False


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "capture":
        sys.exit("usage: python -m appliance.monitoring.nvml_replay capture OUT.json")
    doc = capture(Path(sys.argv[2]))
    print(json.dumps(doc["readings"], indent=1))
