"""A loaded model holds no reference cycle: once a hot swap drops it (and its last request ends) it is freed by
reference counting, so the swap need not walk the whole heap with a full garbage collection (engine.freeze_heap)."""
import gc
import weakref

from tbcm.service.config import ServiceConfig
from tbcm.service.runtime import load_model, same_costs, warm_up_calls


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


def test_a_model_doing_the_same_work_takes_the_live_times_and_warms_up_once_per_size(
        tiny_student_dir, second_student_dir, tiny_teacher_dir):
    config = ServiceConfig(sizes="32,64")
    live, other_weights = load_model(str(tiny_student_dir), config), load_model(str(second_student_dir), config)
    assert same_costs(live, other_weights)
    assert not same_costs(live, load_model(str(tiny_teacher_dir), config))  # no guidance embedding: other work
    assert not same_costs(live, load_model(str(tiny_student_dir), ServiceConfig(sizes="32")))
    timed, untimed = warm_up_calls(live), warm_up_calls(other_weights, timed=False)
    assert len(timed) == len(live.sizes) * (1 + 4) and len(untimed) == len(live.sizes)
    for call in timed:
        call()
    other_weights.times.seed_from(live.times)
    for steps in (1, 3):
        assert other_weights.times.estimate(steps, 32, 2) == live.times.estimate(steps, 32, 2) > 0
