"""A loaded model holds no reference cycle: once a hot swap drops it (and its last request ends) it is freed by
reference counting, so the swap need not walk the whole heap with a full garbage collection (engine.freeze_heap)."""
import gc
import weakref

from tbcm.service.config import ServiceConfig
from tbcm.service.runtime import load_model, warm_up_calls


def test_a_served_model_is_freed_without_the_cyclic_collector():
    model = load_model("student", ServiceConfig())
    for call in warm_up_calls(model):  # through each runner (student path and VAE decode)
        call()
    refs = {name: weakref.ref(obj) for name, obj in [
        ("model", model), ("generator", model.generator), ("pipeline", model.pipe),
        ("transformer", model.pipe.transformer), ("vae", model.pipe.vae)]}
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        del model, call
        assert [name for name, ref in refs.items() if ref() is not None] == []
    finally:
        if was_enabled:
            gc.enable()
