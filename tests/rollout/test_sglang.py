"""SGLang engine against stand-in servers (tests/support/sglang_fake.py) launched as subprocesses.

The stand-in speaks SGLang's endpoints and response shapes; its "model" has an independent
reference (`reference_greedy`), so every token and logprob the engine returns is checked.
"""
import base64
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ace.rollout.engine import RolloutEngine, SamplingParams
from ace.rollout.sglang import SGLangEngine
from ace.rollout.sglang_client import (SGLangClient, SGLangRequestError, ServerUnavailable, parse_generation,
                                       to_sglang_sampling_params)
from ace.rollout.sglang_routing import RoutingFormatError, RoutingLayout, parse_routed_experts
from ace.rollout.sglang_server import SGLangServer, ServerStartError, find_free_port
from ace.rollout.sglang_weights import ArchitectureMismatch
from tests.support.sglang_fake import fake_routing, reference_greedy

REPO = Path(__file__).resolve().parents[2]
DENSE, MOE = "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"
V = 32
GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0)


# A small MoE's config.json keys that shape its routed experts (3 layers, 2 of 8 experts per token).
MOE_KEYS = {"num_hidden_layers": 3, "num_experts_per_tok": 2, "num_experts": 8}


def write_checkpoint(path, *, arch=DENSE, shift=0):
    """Test exporter: what ace.models.hf.save_hf_checkpoint writes, reduced to what the fake reads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": [arch], "vocab_size": V, **(MOE_KEYS if arch == MOE else {})}
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "fake_weights.json").write_text(json.dumps({"shift": shift}))


def exporter(params, path):
    write_checkpoint(path, arch=params["arch"], shift=params["shift"])


@pytest.fixture
def launch(tmp_path):
    servers = []
    write_checkpoint(tmp_path / "base")

    def _launch(*extra, startup_timeout_s=30.0, model_path=None, return_routing=False):
        s = SGLangServer(model_path or tmp_path / "base", port=find_free_port(), tp_size=2,
                         module="tests.support.sglang_fake", extra_args=extra,
                         env={"PYTHONPATH": str(REPO)}, log_path=tmp_path / f"log{len(servers)}.txt",
                         startup_timeout_s=startup_timeout_s, return_routing=return_routing)
        servers.append(s)
        return s.start()

    yield _launch
    for s in servers:
        s.stop()


def events(server):
    return SGLangClient(server.url)._session.get(f"{server.url}/fake/events", timeout=5).json()


def wait_until(cond, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_sampling_params_and_response_parsing_follow_sglang_wire_format():
    p = SamplingParams(max_new_tokens=9, temperature=0.7, top_p=0.9, top_k=0, stop_token_ids=(3,), seed=11)
    assert to_sglang_sampling_params(p) == {"temperature": 0.7, "top_p": 0.9, "top_k": -1,
                                            "max_new_tokens": 9, "stop_token_ids": [3], "sampling_seed": 11}
    obj = {"output_ids": [4, 3], "meta_info": {"output_token_logprobs": [[-0.5, 4, None], [-1.5, 3, "x"]],
                                               "finish_reason": {"type": "stop", "matched": 3},
                                               "weight_version": "7"}}
    g = parse_generation(obj, initial_version=0)
    assert (g.output_ids, g.logprobs, g.finish_reason, g.weight_version) == ([4, 3], [-0.5, -1.5], "stop", 7)
    obj["meta_info"]["weight_version"] = "default"
    assert parse_generation(obj, initial_version=2).weight_version == 2
    with pytest.raises(SGLangRequestError, match="disagree"):
        parse_generation({**obj, "output_ids": [4, 4]}, initial_version=0)
    with pytest.raises(SGLangRequestError, match="return_logprob"):
        parse_generation({"text": "hi", "meta_info": {}}, initial_version=0)
    with pytest.raises(SGLangRequestError, match="not an integer version"):
        parse_generation({**obj, "meta_info": {**obj["meta_info"], "weight_version": "v1"}}, initial_version=0)


def test_server_start_failures_raise_with_log_tail_and_leave_nothing_running(launch, tmp_path):
    with pytest.raises(ServerStartError, match="(?s)exited with code 3.*simulated start-up failure"):
        launch("--fake-exit-at-start")
    with pytest.raises(ServerStartError, match="not healthy after 0.5 s"):
        launch("--fake-startup-s", "30", startup_timeout_s=0.5)
    # The half-started process was stopped on the error path.
    s = SGLangServer(tmp_path / "base", port=find_free_port())
    assert not s.alive()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = SGLangServer(tmp_path / "base", port=busy.getsockname()[1], module="tests.support.sglang_fake")
        with pytest.raises(ServerStartError, match="already in use"):
            taken.start()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        SGLangServer(tmp_path, port=1234)


def test_generate_returns_reference_tokens_logprobs_and_finish_reasons(launch):
    server = launch()
    assert "--tp-size 2" in " ".join(server.command())
    client = SGLangClient(server.url)
    prompts = [[1, 2, 3], [5], [7, 7]]
    gens = client.generate(prompts, [GREEDY] * 3)
    for p, g in zip(prompts, gens):
        ref_ids, ref_lps = reference_greedy(p, shift=0, vocab_size=V, max_new_tokens=6)
        assert g.output_ids == ref_ids and g.finish_reason == "length" and g.weight_version == 0
        assert g.logprobs == pytest.approx(ref_lps, abs=1e-9)
    stop = gens[0].output_ids[2]
    g = client.generate([prompts[0]], [SamplingParams(max_new_tokens=6, temperature=0.0,
                                                      stop_token_ids=(stop,))])[0]
    first = gens[0].output_ids.index(stop)
    assert g.output_ids == gens[0].output_ids[:first + 1] and g.finish_reason == "stop"
    seeded = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=5, seed=3)
    a, b = client.generate([[1], [1]], [seeded, seeded])
    assert a.output_ids == b.output_ids and a.logprobs == b.logprobs
    with pytest.raises(ValueError, match="2 prompts but 1 sampling params"):
        client.generate([[1], [2]], [GREEDY])


def test_pool_dispatches_to_least_loaded_server(launch, tmp_path):
    servers = [launch("--fake-token-s", "0.02"), launch("--fake-token-s", "0.02")]
    with SGLangEngine(servers, exporter=exporter, export_dir=tmp_path / "exports") as engine:
        assert isinstance(engine, RolloutEngine)
        gens = engine.generate([[i] for i in range(8)], GREEDY)
        # While all 8 are in flight, least-loaded alternates: each server serves half.
        counts = [sum(e["event"] == "generate" for e in events(s)) for s in servers]
        assert sum(counts) == 8 and min(counts) >= 3
        for i, g in enumerate(gens):
            assert g.output_ids == reference_greedy([i], shift=0, vocab_size=V, max_new_tokens=6)[0]
        with engine._lock:
            engine._in_flight[:] = [5, 2]
        assert engine._acquire_server(set()) == 1
        assert engine._acquire_server({1}) == 0  # a server this request failed on is avoided


def test_weight_push_is_framed_versioned_and_visible_in_next_response(launch, tmp_path):
    servers = [launch(), launch()]
    with SGLangEngine(servers, exporter=exporter, export_dir=tmp_path / "exports", keep_versions=2) as engine:
        engine.update_weights({"arch": DENSE, "shift": 5}, 1)
        for s in servers:
            control = [e for e in events(s) if e["event"] != "generate"]
            assert [e["event"] for e in control] == ["pause_generation", "update_weights_from_disk",
                                                     "flush_cache", "continue_generation"]
            assert control[1]["paused"] and control[1]["weight_version"] == "1"
            assert control[1]["model_path"] == str(tmp_path / "exports" / "v00000001")
        gens = engine.generate([[1, 2], [3]], GREEDY)
        assert {g.weight_version for g in gens} == {1} and engine.weight_version == 1
        assert gens[0].output_ids == reference_greedy([1, 2], shift=5, vocab_size=V, max_new_tokens=6)[0]
        assert gens[0].output_ids != reference_greedy([1, 2], shift=0, vocab_size=V, max_new_tokens=6)[0]
        with pytest.raises(ValueError, match="version must grow: got 1, engine holds 1"):
            engine.update_weights({"arch": DENSE, "shift": 6}, 1)
        engine.update_weights({"arch": DENSE, "shift": 6}, 2)
        engine.update_weights({"arch": DENSE, "shift": 7}, 3)
        assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["v00000002", "v00000003"]
        assert engine.generate([[1, 2]], GREEDY)[0].weight_version == 3


def test_architecture_mismatch_is_refused_before_the_server_is_touched(launch, tmp_path):
    server = launch()
    with SGLangEngine([server], exporter=exporter, export_dir=tmp_path / "exports") as engine:
        with pytest.raises(ArchitectureMismatch, match=f"(?s){MOE}.*serves.*{DENSE}"):
            engine.update_weights({"arch": MOE, "shift": 1}, 1)
        assert engine.weight_version == 0 and server.alive()
        assert not [e for e in events(server) if e["event"] != "generate"]
        assert engine.generate([[1]], GREEDY)[0].weight_version == 0
    # Why the check exists: pushed anyway, the MoE checkpoint takes the dense server down.
    with pytest.raises(ServerUnavailable):
        SGLangClient(server.url).update_weights_from_disk(tmp_path / "exports" / "v00000001", 1)
    wait_until(lambda: not server.alive())


def test_killed_server_is_retried_elsewhere_restarted_and_brought_to_current_weights(launch, tmp_path):
    servers = [launch(), launch()]
    with SGLangEngine(servers, exporter=exporter, export_dir=tmp_path / "exports") as engine:
        engine.update_weights({"arch": DENSE, "shift": 4}, 1)
        old_pid = servers[0].process.pid
        os.killpg(old_pid, signal.SIGKILL)
        servers[0].process.wait(5)
        prompts = [[i, i + 1] for i in range(6)]
        gens = engine.generate(prompts, GREEDY)  # the first request lands on the dead server
        for p, g in zip(prompts, gens):
            assert g.output_ids == reference_greedy(p, shift=4, vocab_size=V, max_new_tokens=6)[0]
            assert g.weight_version == 1
        assert engine.stats["retries"] >= 1
        wait_until(lambda: engine.stats["restarts"] == 1 and not engine._down)
        assert servers[0].alive() and servers[0].process.pid != old_pid and servers[0].restarts == 1
        # The restarted server serves the pushed weights under the current version tag.
        g = SGLangClient(servers[0].url).generate([[1, 2]], [GREEDY])[0]
        assert g.weight_version == 1
        assert g.output_ids == reference_greedy([1, 2], shift=4, vocab_size=V, max_new_tokens=6)[0]
        assert len(engine.generate(prompts, GREEDY)) == 6


def test_request_aborted_by_weight_update_is_redone_under_new_weights(launch, tmp_path):
    server = launch("--fake-token-s", "0.05")
    with SGLangEngine([server], exporter=exporter, export_dir=tmp_path / "exports") as engine:
        result = {}
        params = SamplingParams(max_new_tokens=8, temperature=0.0)
        t = threading.Thread(target=lambda: result.update(g=engine.generate([[2]], params)[0]))
        t.start()
        wait_until(lambda: engine._in_flight[0] == 1)
        time.sleep(0.1)  # a few tokens in
        engine.update_weights({"arch": DENSE, "shift": 9}, 1)
        t.join(20)
        g = result["g"]
        assert g.finish_reason == "length" and g.weight_version == 1
        assert g.output_ids == reference_greedy([2], shift=9, vocab_size=V, max_new_tokens=8)[0]
        assert engine.stats["aborted_retries"] == 1
        finished = [e["finish_reason"] for e in events(server) if e["event"] == "generate"]
        assert finished == ["abort", "length"]


def test_servers_given_by_url_are_used_checked_and_waited_for_never_restarted(launch, tmp_path):
    """rollout.urls: the pool launches nothing, pushes to every server, and when one goes away it
    waits for its owner to bring it back, then gives it the current version."""
    from ace.rollout.sglang_pool import SGLangPool
    from ace.rollout.sglang_pool_config import SGLangPoolConfig

    a, b = launch(), launch()
    cfg = SGLangPoolConfig.from_cfg({"urls": [a.url, b.url], "router": "never", "monitor_interval_s": 0.2,
                                     "startup_timeout_s": 60})
    pool = SGLangPool.start(cfg, model_path=tmp_path / "base", exporter=exporter, out_dir=tmp_path / "run")
    try:
        assert pool.router is None and pool.engine.router_url is None
        assert all(s.process is None for s in pool.servers)  # nothing launched here
        pool.engine.update_weights({"arch": DENSE, "shift": 3}, 1)
        assert pool.engine.server_versions() == [1, 1]
        prompts = [[1, 2, 3]] * 4
        gens = pool.engine.generate(prompts, SamplingParams(max_new_tokens=4, temperature=0.0))
        assert all(g.weight_version == 1 for g in gens)
        # The owner stops server b: the monitor takes it out of dispatch; requests go to a.
        port = b.port
        b.stop()
        wait_until(lambda: 1 in pool.engine.down())
        gens = pool.engine.generate(prompts, SamplingParams(max_new_tokens=4, temperature=0.0))
        assert len(gens) == 4 and pool.servers[1].restarts == 0
        # The owner restarts it (with the launch-time weights): it is brought to version 1 again.
        b.port = port
        b.start()
        wait_until(lambda: 1 not in pool.engine.down(), timeout_s=30)
        assert pool.engine.server_versions() == [1, 1]
        status = pool.write_status()
        assert [s["weight_version"] for s in status["servers"]] == [1, 1] and status["router"] is None
    finally:
        pool.close()
    assert a.alive() and b.alive(), "closing the pool must not stop servers it did not launch"


# ---------------------------------------------------------------------------- routed experts (MoE)
def b64_int32(rows) -> str:
    """SGLang's encoding of routed experts: base64 of the raw little-endian int32 bytes."""
    return base64.b64encode(np.asarray(rows, "<i4").tobytes()).decode()


def test_routed_experts_wire_format_becomes_layer_major_routing_with_last_position_unset():
    layout = RoutingLayout(num_layers=3, top_k=2, num_experts=8, moe_layers=(0, 1, 2))
    rows = np.arange(4 * 3 * 2).reshape(4, 3, 2) % 8  # [P + T - 1 = 4, layers, k] as SGLang sends it
    got = parse_routed_experts(b64_int32(rows), num_positions=5, layout=layout)
    assert got.dtype == np.int32 and got.shape == (3, 5, 2)
    np.testing.assert_array_equal(got[:, :4], rows.transpose(1, 0, 2))
    assert (got[:, 4] == -1).all()  # the last sampled token never ran through the model
    # Layers without experts (mlp_only_layers) have rows in SGLang's buffer but not in the routing.
    sparse = RoutingLayout(num_layers=3, top_k=2, num_experts=8, moe_layers=(0, 2))
    np.testing.assert_array_equal(parse_routed_experts(b64_int32(rows), num_positions=5, layout=sparse)[:, :4],
                                  rows[:, [0, 2]].transpose(1, 0, 2))
    with pytest.raises(RoutingFormatError, match=r"holds 18 ids = 3 rows.*expected shape.*\[4, 3, 2\]"):
        parse_routed_experts(b64_int32(rows[:3]), num_positions=5, layout=layout)
    with pytest.raises(RoutingFormatError, match="not a whole number of int32"):
        parse_routed_experts(base64.b64encode(b"abc").decode(), num_positions=5, layout=layout)
    with pytest.raises(RoutingFormatError, match="not valid base64"):
        parse_routed_experts("%%%", num_positions=5, layout=layout)
    with pytest.raises(RoutingFormatError, match="base64 string, got list"):
        parse_routed_experts(rows.tolist(), num_positions=5, layout=layout)
    with pytest.raises(RoutingFormatError, match=r"ids \[9, 1\] at position 2, layer 1 are not all in \[0, 8\)"):
        bad = rows.copy()
        bad[2, 1] = [9, 1]
        parse_routed_experts(b64_int32(bad), num_positions=5, layout=layout)


def test_generation_routing_is_parsed_from_meta_info_and_required_when_asked(tmp_path):
    layout = RoutingLayout(num_layers=1, top_k=2, num_experts=4, moe_layers=(0,))
    meta = {"output_token_logprobs": [[-0.5, 4, None], [-1.5, 3, None]], "finish_reason": {"type": "length"},
            "routed_experts": b64_int32([[[0, 1]], [[2, 3]], [[1, 2]]])}
    g = parse_generation({"meta_info": meta}, initial_version=0, prompt_len=2, routing=layout)
    np.testing.assert_array_equal(g.routing, [[[0, 1], [2, 3], [1, 2], [-1, -1]]])
    assert parse_generation({"meta_info": meta}, initial_version=0).routing is None  # not asked: ignored
    with pytest.raises(SGLangRequestError, match=r"expected shape \[P \+ T - 1, 1, 2\] = \[4, 1, 2\]"):
        parse_generation({"meta_info": meta}, initial_version=0, prompt_len=3, routing=layout)
    no_routing = {k: v for k, v in meta.items() if k != "routed_experts"}
    with pytest.raises(SGLangRequestError, match="--enable-return-routed-experts"):
        parse_generation({"meta_info": no_routing}, initial_version=0, prompt_len=2, routing=layout)
    aborted = {**no_routing, "finish_reason": {"type": "abort"}}  # redone by the engine anyway
    assert parse_generation({"meta_info": aborted}, initial_version=0, prompt_len=2, routing=layout).routing is None
    # The layout comes from the served folder's config.json (Qwen3-MoE's rule for sparse layers).
    write_checkpoint(tmp_path / "moe", arch=MOE)
    assert RoutingLayout.from_hf_config(tmp_path / "moe") == RoutingLayout(3, 2, 8, (0, 1, 2))
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    (tmp_path / "moe" / "config.json").write_text(json.dumps({**cfg, "mlp_only_layers": [1]}))
    assert RoutingLayout.from_hf_config(tmp_path / "moe").moe_layers == (0, 2)
    write_checkpoint(tmp_path / "dense")
    with pytest.raises(ValueError, match="not an MoE model"):
        RoutingLayout.from_hf_config(tmp_path / "dense")


def test_engine_returns_routing_of_every_request_from_servers_launched_for_it(launch, tmp_path):
    write_checkpoint(tmp_path / "moe", arch=MOE)
    server = launch(model_path=tmp_path / "moe", return_routing=True)
    assert "--enable-return-routed-experts" in server.command()
    prompts = [[1, 2, 3], [5], [7, 7, 7, 7, 7]]
    with SGLangEngine([server], exporter=exporter, export_dir=tmp_path / "exports", return_routing=True) as engine:
        gens = engine.generate(prompts, GREEDY)
    for prompt, g in zip(prompts, gens):
        seq = prompt + g.output_ids
        want = np.asarray(fake_routing(seq, num_layers=3, top_k=2, num_experts=8)).transpose(1, 0, 2)
        assert g.routing.shape == (3, len(seq), 2)
        np.testing.assert_array_equal(g.routing[:, :-1], want)
        assert (g.routing[:, -1] == -1).all()
    # A server launched without the flag answers without routed experts: a clear error, not a None.
    plain = launch(model_path=tmp_path / "moe")
    with SGLangEngine([plain], exporter=exporter, export_dir=tmp_path / "exports2", return_routing=True) as engine:
        with pytest.raises(SGLangRequestError, match="--enable-return-routed-experts"):
            engine.generate(prompts[:1], GREEDY)
    with pytest.raises(ValueError, match="not an MoE model"):
        SGLangEngine([launch()], exporter=exporter, export_dir=tmp_path / "e3", return_routing=True)


def test_pool_return_routing_launches_with_the_flag_and_bypasses_the_router(launch, tmp_path):
    from ace.rollout.sglang_pool import SGLangPool
    from ace.rollout.sglang_pool_config import PoolConfigError, SGLangPoolConfig

    assert SGLangPoolConfig.from_cfg({}).return_routing is False
    cfg = SGLangPoolConfig.from_cfg({"num_servers": 2, "device": "cpu", "return_routing": True})
    assert cfg.return_routing and not cfg.uses_router  # sglang-router would drop the request field
    with pytest.raises(PoolConfigError, match="return_routing=true cannot go through sglang-router"):
        SGLangPoolConfig.from_cfg({"num_servers": 2, "router": "always", "return_routing": True})
    with pytest.raises(PoolConfigError, match="return_routing"):
        SGLangPoolConfig.from_cfg({"return_routing": "yes"})
    # Servers given by URL (launched with the flag) behind a pool that asks for routing.
    write_checkpoint(tmp_path / "moe", arch=MOE)
    a, b = (launch(model_path=tmp_path / "moe", return_routing=True) for _ in range(2))
    cfg = SGLangPoolConfig.from_cfg({"urls": [a.url, b.url], "return_routing": True, "startup_timeout_s": 60})
    pool = SGLangPool.start(cfg, model_path=tmp_path / "moe", exporter=exporter, out_dir=tmp_path / "run")
    try:
        assert pool.router is None and pool.engine.router_url is None
        gens = pool.engine.generate([[1, 2], [3]] * 2, GREEDY)
        assert [g.routing.shape for g in gens] == [(3, 2 + 6, 2), (3, 1 + 6, 2)] * 2
        assert sum(e["event"] == "generate" for s in (a, b) for e in events(s)) == 4
    finally:
        pool.close()
