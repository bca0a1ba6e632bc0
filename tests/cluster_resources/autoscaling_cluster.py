"""A local autoscaling Ray cluster on Ray's fake multi-node provider (what `ray.cluster_utils.AutoscalingCluster`
starts), without its side effects on this machine.

AutoscalingCluster itself cannot be used as is: its `start()` and `shutdown()` run `ray stop --force`, which ends
every Ray cluster of the user on the machine (other jobs' too); its base config (fake_multi_node/example.yaml) is
not in the Ray wheel, nor the provider defaults autoscaler v2 reads from it; and the fake provider joins worker
nodes to port 6379 unless the provider config names the GCS address. So the same config is built here (with the
provider as an "external" one), the head gets a free port and a private temp dir, and the cluster is ended by
killing its own process group (the head's processes and the worker nodes its monitor starts)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def autoscaling_config(head_resources: dict, worker_node_types: dict, gcs_address: str, v2: bool) -> dict:
    """The config AutoscalingCluster generates (its example.yaml base, inlined), with the GCS address."""
    # "external" with the fake provider's class: the "fake_multinode" type would read its defaults from the
    # missing example.yaml (autoscaler v2 does).
    provider = {"type": "external", "module": "ray.autoscaler._private.fake_multi_node.node_provider."
                "FakeMultiNodeProvider", "use_node_id_as_ip": True, "disable_node_updaters": True,
                "disable_launch_config_check": True, "gcs_address": gcs_address}
    if v2:
        from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

        provider.update(launch_multiple=True, head_node_id=FAKE_HEAD_NODE_ID)
    return {
        "cluster_name": "fake_multinode", "max_workers": 8, "provider": provider,
        "available_node_types": {**worker_node_types, "ray.head.default": {"resources": head_resources,
                                                                          "node_config": {}, "max_workers": 0}},
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 1,
        "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
        "rsync_filter": [],
    }


class LocalAutoscalingCluster:
    def __init__(self, head_cpus: int, worker_node_types: dict, v2: bool = False):
        import ray

        self.port = _free_port()
        self.address = f"{ray._private.services.get_node_ip_address()}:{self.port}"
        self.tmp = tempfile.mkdtemp(prefix="crvas", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
        self.config = autoscaling_config({"CPU": head_cpus}, worker_node_types, self.address, v2)
        self.head_cpus, self.v2 = head_cpus, v2
        self.proc: subprocess.Popen | None = None
        # Token auth is on by default for `ray start` clusters; the test's driver joins without one.
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled"}

    def start(self) -> None:
        from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

        path = os.path.join(self.tmp, "autoscaling.json")
        with open(path, "w") as f:
            json.dump(self.config, f)
        env = {**self.env, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"}
        if self.v2:
            env.update(RAY_enable_autoscaler_v2="1", RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_NODE_ID,
                       RAY_OVERRIDE_NODE_ID_FOR_TESTING=FAKE_HEAD_NODE_ID)
        cmd = ["ray", "start", "--head", "--block", f"--port={self.port}", f"--temp-dir={self.tmp}",
               f"--num-cpus={self.head_cpus}", f"--autoscaling-config={path}", "--dashboard-port=0",
               f"--ray-client-server-port={_free_port()}", "--disable-usage-stats"]
        self.log = open(os.path.join(self.tmp, "head.log"), "w")
        # Its own session: every process of this cluster is in one group that teardown can end.
        self.proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=self.log, stderr=subprocess.STDOUT)

    def shutdown(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
            time.sleep(0.5)
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def head_log(self) -> str:
        with open(os.path.join(self.tmp, "head.log")) as f:
            return f.read()[-3000:]
