"""A Serve app for the budget-policy integration test: two deployments whose
replicas each take one `fake_gpu` (a custom resource standing in for GPUs) and
report queue pressure set by the test. Imported by Serve from PYTHONPATH."""

from ray import serve


@serve.deployment(
    ray_actor_options={"num_cpus": 0.01, "resources": {"fake_gpu": 1}},
    autoscaling_config={"min_replicas": 1, "max_replicas": 3, "upscale_delay_s": 0,
                        "downscale_delay_s": 2, "metrics_interval_s": 0.25,
                        "look_back_period_s": 0.5},
    health_check_period_s=1,
    graceful_shutdown_timeout_s=1,
    graceful_shutdown_wait_loop_s=0.5,
)
class Pressure:
    def __init__(self) -> None:
        self.images = 0.0

    def set(self, images: float) -> None:
        self.images = images

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"queued_images": self.images, "running_images": 0.0}


@serve.deployment(ray_actor_options={"num_cpus": 0.01})
class Root:
    def __init__(self, hi, lo) -> None:
        self.handles = {"hi": hi, "lo": lo}

    async def __call__(self, request) -> str:
        return "ok"


app = Root.bind(Pressure.options(name="hi").bind(), Pressure.options(name="lo").bind())
