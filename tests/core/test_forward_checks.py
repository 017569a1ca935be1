"""``RWKV7.forward``'s input checks: ids are range-checked on the host, before the copy
to the model's device, so a GPU decode step never waits for a device sync."""
import pytest
import torch


@pytest.mark.parametrize("bad", [[[5, 65536]], [[-1, 3]], torch.tensor([[1, 70000]])])
def test_out_of_range_ids_are_rejected_before_any_compute(tiny_model, bad):
    with pytest.raises(ValueError, match="token id out of range for vocabulary size 65536"):
        tiny_model.forward(bad, tiny_model.new_state(1))


def test_in_range_lists_and_cpu_tensors_are_accepted(tiny_model):
    a, _ = tiny_model.forward([[1, 2, 65535]], None)
    b, _ = tiny_model.forward(torch.tensor([[1, 2, 65535]]), None)
    assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_decode_step_with_device_ids_does_not_sync(tiny_model_path):
    """The old check did int(tokens.max()) and int(tokens.min()) on the device tensor:
    two synchronisations per decode step."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA/ROCm GPU")
    import rwkv_engine
    model = rwkv_engine.load_model(tiny_model_path, device="cuda")
    _, state = model.forward([[1, 2, 3]], None)
    ids = torch.tensor([[4]], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model.forward(ids, state)
    finally:
        torch.cuda.set_sync_debug_mode("default")
