"""Layers and MiB per device, read from llama.cpp's own load log."""

from server.engine.layout import DeviceShare, LoadLog, rpc_buffers

# As llama.cpp 0.3.36 logs a 2-layer model split over one worker and this machine.
LINES = [
    "load_tensors: layer   0 assigned to device RPC0, is_swa = 0",
    "load_tensors: layer   1 assigned to device RPC0, is_swa = 0",
    "load_tensors: layer   2 assigned to device CPU, is_swa = 0",
    "load_tensors: offloading 2 repeating layers to GPU",
    "load_tensors: RPC0[127.0.0.1:50052] model buffer size =    40.50 MiB",
    "load_tensors:   CPU_Mapped model buffer size =    28.00 MiB",
    "llama_kv_cache: RPC0[127.0.0.1:50052] KV buffer size =    16.00 MiB",
    "llama_context: RPC0[127.0.0.1:50052] compute buffer size =    99.00 MiB",
    "llama_context:        CPU compute buffer size =    99.00 MiB",
]


def test_layers_and_bytes_per_device() -> None:
    log = LoadLog()
    for line in LINES:
        log.feed(line)
    worker, here = log.devices(rpc_buffers([("RPC0", "127.0.0.1:50052")]))
    assert worker == DeviceShare("RPC0", 2, int(56.5 * 2**20), worker="127.0.0.1:50052")
    assert worker.describe() == "RPC0 (127.0.0.1:50052) 2 layers 56 MiB"
    assert here == DeviceShare("CPU", 1, 28 * 2**20, output=True)  # layer 2: the output
    assert here.describe() == "CPU 1 layer + output 28 MiB"
    # A second worker's first device is "RPC1", but its buffers say "RPC0[its address]".
    names = rpc_buffers([("RPC0", "a:1"), ("RPC1", "b:2"), ("RPC2", "b:2")])
    assert names["RPC0[b:2]"] == ("RPC1", "b:2") and names["RPC1[b:2]"] == ("RPC2", "b:2")
    log.reset()
    assert log.devices() == ()
