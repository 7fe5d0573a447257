"""A vLLM worker extension that loads a stored model's weights into a running engine: an engine
set up beforehand on a model's shape with placeholder weights (`--load-format dummy`) takes any
stored model of that shape without a restart (docs/gpu.md, "an engine kept set up")."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from appliance.store.vllm_plugin import StoreLoadSpec, load_stored_weights

# vLLM's worker class takes this class's methods (`--worker-extension-cls`), which the engine's
# `collective_rpc` calls by name on every worker (appliance/serving/kept_engine.py's claim).
WORKER_EXTENSION = f"{__name__}.StoreWeights"
LOAD_METHOD = "load_store_weights"

# Under "vllm.": vLLM's handlers print it in the instance's log, as the loader's lines.
log = logging.getLogger("vllm.appliance.store")


class StoreWeights:
    """Methods vLLM mixes into each of its workers; `self` is the worker."""

    model_runner: Any
    model_config: Any

    def load_store_weights(self, spec_json: str) -> float:
        """Load the stored model that `spec_json` (a StoreLoadSpec as JSON, as vLLM's own
        /collective_rpc would pass it) names into this worker's model, as the store's loader
        does at a start; returns the seconds it took. The model's policy is checked as at a
        start."""
        # As vLLM's own reload_weights does: processing after a load may have repacked the
        # parameters into a kernel's layout (on CPU, emptied), so they are restored first and
        # each layer processed again once its weights are in.
        from vllm.model_executor.model_loader.reload.layerwise import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )

        started = time.perf_counter()
        spec = StoreLoadSpec.from_dict(json.loads(spec_json))
        stored = spec.open()  # the policy first: a refusal leaves the engine as it was
        opened = time.perf_counter()
        model = self.model_runner.get_model()
        # Named before the restore, which unties tied weights (an output layer that is the
        # embedding) until the layers are processed again.
        names = {name for name, _ in model.named_parameters()}
        finished = []

        def finish() -> None:
            finalize_layerwise_reload(model, self.model_config)
            finished.append(True)

        initialize_layerwise_reload(model)
        restored = time.perf_counter()
        try:
            load_stored_weights(model, spec, names, finish, stored, kept_by_model=True)
        finally:
            # A load that failed midway: the layers get their tensors back (some old, some
            # new), so the engine still runs; the claim failed, and it is not to be served.
            if not finished:
                finalize_layerwise_reload(model, self.model_config)
        ended = time.perf_counter()
        log.info(
            "appliance-store: into the running engine: policy and keys %.2f s, layers set for "
            "reloading %.2f s, weights %.2f s",
            opened - started,
            restored - opened,
            ended - restored,
        )
        return ended - started
