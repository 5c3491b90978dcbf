"""Continuum memory on stock HF models (tiny Llama / Qwen2 built offline): every operation, checked against the
host model or a hand-written reference."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

from sleep_trl.memory import (
    LevelConfig,
    LevelSchedule,
    MemoryConfig,
    attach_memory,
    detach_memory,
    find_memory,
    has_memory,
    load_memory,
    read_memory_config,
)
from sleep_trl.tiny import build_model

ARCHS = ["llama", "qwen2"]


@pytest.fixture(scope="module")
def input_ids(tiny_tokenizer):
    torch.manual_seed(1)
    return torch.randint(0, len(tiny_tokenizer), (2, 10))


def small_config(**kwargs) -> MemoryConfig:
    """fast: 1 fixed slot; slow: 3 routed slots (the default shape, at tiny sizes)."""
    levels = kwargs.pop(
        "levels", [LevelConfig("fast", num_slots=1, rank=8, chunk_size=10), LevelConfig("slow", num_slots=3, rank=8)]
    )
    return MemoryConfig(levels=levels, **kwargs)


def make(tiny_tokenizer, arch, config=None, **model_kwargs):
    model = build_model(tiny_tokenizer, arch=arch, **model_kwargs).eval()
    return model, attach_memory(model, config or small_config())


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def randomize(params, std=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def train_steps(model, ids, params, steps=3, lr=1e-2, weight_decay=0.1, optimizer=None):
    opt = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return opt


# --------------------------------------------------------------------------- attach / identity
@pytest.mark.parametrize("arch", ARCHS)
def test_attach_is_identity_masked_and_unlocked(tiny_tokenizer, input_ids, arch):
    model = build_model(tiny_tokenizer, arch=arch).eval()
    ref = logits(model, input_ids)
    n_host = sum(p.numel() for p in model.parameters())
    mem = attach_memory(model, small_config())
    # parameters are registered on the model, one per slot, under the MLP
    names = [n for n, _ in model.named_parameters() if ".mlp.memory." in n]
    assert "model.layers.0.mlp.memory.slow.router_2" in names and "model.layers.1.mlp.memory.fast.down_0" in names
    assert sum(p.numel() for p in model.parameters()) - n_host == mem.num_parameters() > 0
    assert all(not p.requires_grad for p in mem.parameters())
    assert torch.equal(logits(model, input_ids), ref)  # every slot locked
    mem.expand("fast")
    mem.expand("slow")
    mem.expand("slow")  # unlocked, B still zero
    torch.testing.assert_close(logits(model, input_ids), ref, atol=1e-5, rtol=0)
    assert mem.num_parameters(active_only=True) > 0
    assert find_memory(model) is mem


@pytest.mark.parametrize("arch", ARCHS)
def test_bank_forward_matches_hand_written_reference(tiny_tokenizer, arch):
    model, mem = make(tiny_tokenizer, arch)
    mem.expand("fast")
    mem.expand("slow")
    mem.expand("slow")
    randomize(mem.parameters(), seed=3)
    x = torch.randn(2, 5, model.config.hidden_size)
    block = mem.blocks[0]
    fast, slow = block.fast, block.slow

    def expert(bank, s):
        return F.linear(F.silu(F.linear(x, getattr(bank, f"gate_{s}"))) * F.linear(x, getattr(bank, f"up_{s}")),
                        getattr(bank, f"down_{s}"))

    expected = expert(fast, 0)
    for s in range(2):
        g = torch.sigmoid(x @ getattr(slow, f"router_{s}")[0] + getattr(slow, f"router_bias_{s}"))
        expected = expected + g.unsqueeze(-1) * expert(slow, s)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)
    # random-expert sampling: one uniform pick among unlocked slots per token gets gate 1
    with mem.random_experts(seed=7):
        got = block(x)
    pick = torch.randint(2, (2, 5), generator=torch.Generator().manual_seed(7))
    expected = expert(fast, 0)
    for s in range(2):
        g = torch.sigmoid(x @ getattr(slow, f"router_{s}")[0] + getattr(slow, f"router_bias_{s}"))
        g = torch.where(pick == s, torch.ones_like(g), g)
        expected = expected + g.unsqueeze(-1) * expert(slow, s)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_plain_mlp_experts_and_dense_export(tmp_path):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=2, bos_token_id=0, eos_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 64, (2, 8))
    ref = logits(model, ids)
    mem = attach_memory(model, MemoryConfig(levels=[LevelConfig("fast", 2, 8, gate="fixed")]))
    assert mem.form == "plain"
    assert "gpt_neox.layers.0.mlp.memory.fast.up_1" in dict(model.named_parameters())
    mem.expand("fast")
    torch.testing.assert_close(logits(model, ids), ref, atol=1e-5, rtol=0)
    randomize(mem.parameters("fast", slots=[0]))
    x = torch.randn(3, 64)
    bank = mem.blocks[1].fast
    mlp = model.gpt_neox.layers[1].mlp
    torch.testing.assert_close(bank(x), F.linear(mlp.act(F.linear(x, bank.up_0)), bank.down_0))
    out = logits(model, ids)
    mem.export_dense(tmp_path / "dense")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert dense.config.intermediate_size == 96 + 2 * 8
    torch.testing.assert_close(logits(dense, ids), out, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- expand: only the new slot trains
@pytest.mark.parametrize("arch", ARCHS)
def test_only_the_expanded_slot_trains(tiny_tokenizer, input_ids, arch):
    model, mem = make(tiny_tokenizer, arch)
    names = mem.expand("fast")
    assert sorted(names) == sorted(f"model.layers.{i}.mlp.memory.fast.{p}_0" for i in (0, 1) for p in
                                   ("gate", "up", "down"))
    mem.freeze_all_but(names)
    before = snapshot(model)
    # AdamW with weight decay over *every* parameter of the model: frozen ones must not move
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == set(names)
    opt.step()
    opt.zero_grad()
    train_steps(model, input_ids, None, steps=2, optimizer=opt)
    after = snapshot(model)
    for n in after:
        if n in names:
            assert not torch.equal(after[n], before[n]), n
        else:
            assert torch.equal(after[n], before[n]), n

    # next expansion, *same* optimizer (it holds AdamW state and weight decay for the fast slot): only slow slot 0
    names2 = mem.expand("slow")
    assert sorted(n.rsplit(".", 1)[1] for n in names2 if ".layers.0." in n) == [
        "down_0", "gate_0", "router_0", "router_bias_0", "up_0"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names2)  # expand froze the fast slot
    mem.freeze_all_but(names2)
    before = snapshot(model)
    train_steps(model, input_ids, None, steps=3, optimizer=opt)
    after = snapshot(model)
    for n in after:
        assert torch.equal(after[n], before[n]) == (n not in names2), n
    assert set(mem.trainable_parameters()) == set(names2)


# --------------------------------------------------------------------------- teacher view
@pytest.mark.parametrize("arch", ARCHS)
def test_teacher_view_is_the_model_before_the_newest_expand(tiny_tokenizer, input_ids, arch):
    model, mem = make(tiny_tokenizer, arch)
    with pytest.raises(RuntimeError, match="needs a previous mem.expand"):
        with mem.teacher_view():
            pass
    ref = logits(model, input_ids)
    # wake: learn in the fast level
    names = mem.expand("fast")
    mem.freeze_all_but(names)
    train_steps(model, input_ids, [p for p in model.parameters() if p.requires_grad], steps=3)
    awake = logits(model, input_ids)
    assert not torch.allclose(awake, ref, atol=1e-4)
    # sleep: new slow expert; the student does not see the fast level, the teacher does
    names = mem.expand("slow")
    mem.suspend("fast")
    mem.freeze_all_but(names)
    train_steps(model, input_ids, [p for p in model.parameters() if p.requires_grad], steps=3)
    student = logits(model, input_ids)
    storages = [p.data_ptr() for p in model.parameters()]
    with mem.teacher_view():
        teacher = logits(model, input_ids)
        assert [p.data_ptr() for p in model.parameters()] == storages  # same weights, nothing copied or swapped
        with pytest.raises(RuntimeError, match="inside mem.teacher_view"):
            mem.expand("slow")
        with pytest.raises(RuntimeError, match="do not nest"):
            with mem.teacher_view():
                pass
    torch.testing.assert_close(teacher, awake, atol=1e-6, rtol=0)
    assert not torch.allclose(student, teacher, atol=1e-4)
    assert torch.equal(logits(model, input_ids), student)  # leaving the view restores the student
    assert mem.is_suspended("fast") and mem.unlocked("slow") == 1
    # the long-term memory before this sleep (the replay teacher): the new slot masked and the fast level silent
    with mem.teacher_view(suspend=["fast"]):
        long_term = logits(model, input_ids)
    torch.testing.assert_close(long_term, ref, atol=1e-6, rtol=0)
    with pytest.raises(KeyError):
        with mem.teacher_view(suspend=["no-such-level"]):
            pass


# --------------------------------------------------------------------------- reset
@pytest.mark.parametrize("arch", ARCHS)
def test_reset_restores_the_pre_wake_function(tiny_tokenizer, input_ids, arch):
    model, mem = make(tiny_tokenizer, arch)
    initial = mem.state_dict()
    ref = logits(model, input_ids)
    names = mem.expand("fast")
    mem.freeze_all_but(names)
    opt = train_steps(model, input_ids, [p for p in model.parameters() if p.requires_grad], steps=3)
    mem.suspend("fast")
    mem.expand("slow")
    randomize(mem.parameters("slow", slots=[0]), seed=1)
    assert not torch.allclose(logits(model, input_ids), ref, atol=1e-4)
    assert all(p in opt.state for p in mem.parameters("fast"))
    mem.reset("fast", optimizer=opt)
    assert not any(p in opt.state for p in mem.parameters("fast"))  # no stale AdamW moments for the next wake
    assert mem.unlocked("fast") == 0 and not mem.is_suspended("fast")
    after = mem.state_dict()
    for k, v in initial.items():
        if ".fast." in k:
            assert torch.equal(after[k], v), k  # A redrawn from its seed, B zero: exactly the initial values
    with pytest.raises(RuntimeError, match="reset"):
        with mem.teacher_view():
            pass
    mem.reset("slow")
    assert torch.equal(logits(model, input_ids), ref)
    assert all(not p.requires_grad and p.grad is None for p in mem.parameters())


# --------------------------------------------------------------------------- random experts
@pytest.mark.parametrize("arch", ARCHS)
def test_random_experts_only_change_routed_levels(tiny_tokenizer, input_ids, arch):
    model, mem = make(tiny_tokenizer, arch)
    mem.expand("fast")
    randomize(mem.parameters("fast"), seed=2)
    base = logits(model, input_ids)
    with mem.random_experts(seed=0):
        assert torch.equal(logits(model, input_ids), base)  # fixed level: every expert is already on
    mem.expand("slow")
    mem.expand("slow")
    randomize(mem.parameters("slow", slots=[0, 1]), seed=4)
    base = logits(model, input_ids)
    with mem.random_experts(seed=0):
        a = logits(model, input_ids)
    with mem.random_experts(seed=0):
        b = logits(model, input_ids)
    with mem.random_experts(seed=1):
        c = logits(model, input_ids)
    assert torch.equal(a, b)
    assert not torch.allclose(a, base, atol=1e-4) and not torch.allclose(a, c, atol=1e-6)
    assert torch.equal(logits(model, input_ids), base)  # leaving the context turns sampling off
    with mem.suspended("slow"), mem.random_experts(seed=0):
        assert not torch.allclose(logits(model, input_ids), base, atol=1e-4)
        no_slow = logits(model, input_ids)
    with mem.suspended("slow"):
        assert torch.equal(logits(model, input_ids), no_slow)  # a suspended level stays silent
    assert not mem.is_suspended("slow")


def test_recording_gates_gives_the_newest_slots_router_gate_in_every_layer(tiny_tokenizer, input_ids):
    """What a sleep's router loss reads: sigmoid(w . x + b) of the newest slot, per attached layer, per token, in the
    autograd graph; nothing from forwards in which the slot is masked (a teacher view)."""
    model, mem = make(tiny_tokenizer, "qwen2")
    mem.expand("slow")
    mem.expand("slow")
    randomize(mem.parameters("slow", slots=[0, 1]), std=0.3, seed=5)
    inputs = {}
    hooks = [mem.blocks[i].banks["slow"].register_forward_pre_hook(
        lambda module, args, i=i: inputs.setdefault(i, args[0].detach())) for i in mem.layers]
    with mem.recording_gates() as gates:
        model(input_ids)
        with mem.teacher_view():
            model(input_ids)  # slot 1 masked: nothing recorded
    for h in hooks:
        h.remove()
    assert len(gates) == len(mem.layers)
    for gate, i in zip(gates, mem.layers):
        bank = mem.blocks[i].banks["slow"]
        expected = torch.sigmoid(inputs[i] @ bank.router_1[0] + bank.router_bias_1)
        torch.testing.assert_close(gate.detach(), expected, atol=1e-6, rtol=0)
        assert gate.shape == input_ids.shape and gate.requires_grad
    assert mem.state.gate_record is None  # only inside the context
    mem.expand("fast")
    with pytest.raises(ValueError, match="only routed"):
        with mem.recording_gates():
            pass
    with mem.recording_gates("slow", 0) as first:
        model(input_ids)
    assert len(first) == len(mem.layers)


# --------------------------------------------------------------------------- schedule
def test_schedule_boundaries_slowest_first():
    levels = [LevelConfig("fast", 1, 4, chunk_size=1000), LevelConfig("mid", 5, 4, chunk_size=5000),
              LevelConfig("slow", 8, 4, chunk_size=None)]
    s = LevelSchedule(levels)
    assert s.due_levels(0) == []
    assert s.due_levels(999) == []
    assert s.due_levels(1000) == ["fast"]
    assert s.due_levels(4000) == ["fast"]
    assert s.due_levels(5000) == ["mid", "fast"]
    assert s.due_levels(10000) == ["mid", "fast"]
    assert s.due_levels(12345) == []
    assert s.plan(5000) == [("mid", "slow"), ("fast", "mid")]
    assert s.plan(3000) == [("fast", "mid")]
    assert s.target("slow") is None
    assert s.next_boundary(0) == 1000 and s.next_boundary(1000) == 2000 and s.next_boundary(4999) == 5000
    assert LevelSchedule([LevelConfig("only", 2, 4)]).next_boundary(7) is None
    with pytest.raises(ValueError, match="global_step"):
        s.due_levels(-1)
    # hand count over a run of 20k steps: 20 fast boundaries, 4 mid ones, never slow
    counts = {"fast": 0, "mid": 0, "slow": 0}
    for step in range(20001):
        for name in s.due_levels(step):
            counts[name] += 1
    assert counts == {"fast": 20, "mid": 4, "slow": 0}


def test_memory_due_levels_uses_the_config(tiny_tokenizer):
    _, mem = make(tiny_tokenizer, "llama")
    assert mem.due_levels(10) == ["fast"] and mem.due_levels(15) == [] and mem.schedule.target("fast") == "slow"


# --------------------------------------------------------------------------- config and errors
def test_config_validation_errors(tiny_tokenizer):
    with pytest.raises(ValueError, match="duplicate"):
        MemoryConfig(levels=[LevelConfig("a"), LevelConfig("a")])
    with pytest.raises(ValueError, match="non-decreasing"):
        MemoryConfig(levels=[LevelConfig("a", chunk_size=100), LevelConfig("b", chunk_size=10)])
    with pytest.raises(ValueError, match="chunk_size=None only"):
        MemoryConfig(levels=[LevelConfig("a"), LevelConfig("b", chunk_size=10)])
    with pytest.raises(ValueError, match="gate"):
        LevelConfig("a", gate="softmax")
    with pytest.raises(ValueError, match="reserved"):
        LevelConfig("forward")
    with pytest.raises(ValueError, match="num_slots"):
        LevelConfig("a", num_slots=0)
    with pytest.raises(ValueError, match="Unknown MemoryConfig field"):
        MemoryConfig.from_dict({"levls": []})
    with pytest.raises(ValueError, match="Unknown LevelConfig field"):
        MemoryConfig.from_dict({"levels": [{"name": "a", "slots": 2}]})
    cfg = MemoryConfig.from_dict({"levels": [{"name": "a", "num_slots": 2, "rank": 4}], "layers": [-1]})
    assert cfg.levels[0].resolved_gate == "sigmoid" and LevelConfig("b").resolved_gate == "fixed"
    assert MemoryConfig.from_dict(cfg.to_dict()) == cfg
    default = MemoryConfig()
    assert [(lv.name, lv.num_slots, lv.rank, lv.resolved_gate) for lv in default.levels] == [
        ("fast", 1, 64, "fixed"), ("slow", 5, 64, "sigmoid")]
    model = build_model(tiny_tokenizer, arch="llama")
    with pytest.raises(ValueError, match="outside the model's 2 decoder layers"):
        attach_memory(model, MemoryConfig(layers=[2]))
    mem = attach_memory(model, small_config(layers=[-1]))
    assert mem.layers == [1]
    with pytest.raises(RuntimeError, match="already has a continuum memory"):
        attach_memory(model, small_config())
    with pytest.raises(KeyError, match="Unknown memory level 'medium'"):
        mem.expand("medium")
    mem.expand("fast")
    with pytest.raises(RuntimeError, match="no free slot"):
        mem.expand("fast")
    with pytest.raises(ValueError, match="no parameter called"):
        mem.freeze_all_but(["model.layers.9.mlp.nope"])


# --------------------------------------------------------------------------- persistence
@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_give_identical_logits_and_state(tiny_tokenizer, input_ids, arch, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model, mem = make(tiny_tokenizer, arch)
    ref = logits(model, input_ids)
    mem.expand("fast")
    randomize(mem.parameters("fast"), seed=5)
    awake = logits(model, input_ids)
    mem.expand("slow")
    mem.suspend("fast")
    randomize(mem.parameters("slow", slots=[0]), seed=6)
    student = logits(model, input_ids)

    assert "save_pretrained" not in model.__dict__  # nothing on the model instance is patched
    mem.save_pretrained(tmp_path / "ckpt")  # the host checkpoint and the memory files beside it
    assert has_memory(tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if ".memory." in k]  # the host checkpoint stays plain
    assert read_memory_config(tmp_path / "ckpt") == mem.config
    host = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert torch.equal(logits(host, input_ids), ref)
    mem2 = load_memory(host, tmp_path / "ckpt")
    assert torch.equal(logits(host, input_ids), student)
    assert mem2.unlocked("fast") == 1 and mem2.unlocked("slow") == 1 and mem2.is_suspended("fast")
    with mem2.teacher_view():
        torch.testing.assert_close(logits(host, input_ids), awake, atol=1e-6, rtol=0)
    assert set(mem2.trainable_parameters()) == set(mem.trainable_parameters())
    assert {n for n, p in host.named_parameters() if p.requires_grad and ".memory." in n} == set(
        mem2.trainable_parameters())
    # explicit save into a directory of its own; a mismatching model is refused
    mem.save(tmp_path / "mem_only")
    assert sorted(os.listdir(tmp_path / "mem_only")) == ["memory.safetensors", "memory_config.json"]
    meta = json.loads((tmp_path / "mem_only" / "memory_config.json").read_text())
    assert meta["state"]["unlocked"] == {"fast": 1, "slow": 1}
    other = build_model(tiny_tokenizer, arch=arch, hidden_size=96, num_attention_heads=3)
    with pytest.raises(ValueError, match="hidden size"):
        load_memory(other, tmp_path / "mem_only")
    with pytest.raises(FileNotFoundError, match="memory_config.json"):
        load_memory(build_model(tiny_tokenizer, arch=arch), tmp_path / "nothing")


# --------------------------------------------------------------------------- dense export
@pytest.mark.parametrize("arch", ARCHS)
def test_dense_export_folds_fixed_levels_exactly(tiny_tokenizer, input_ids, arch, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = small_config(layers=[1], levels=[LevelConfig("fast", 1, 8, chunk_size=10),
                                           LevelConfig("slow", 3, 8, gate="fixed")])
    model, mem = make(tiny_tokenizer, arch, cfg)
    width = model.config.intermediate_size + 8 + 3 * 8
    mem.export_dense(tmp_path / "d0")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "d0").config.intermediate_size == width
    mem.expand("fast")
    randomize(mem.parameters("fast"), seed=7)
    mem.expand("slow")
    mem.expand("slow")
    randomize(mem.parameters("slow", slots=[0, 1]), seed=8)
    out = logits(model, input_ids)
    mem.export_dense(tmp_path / "d1", tokenizer=tiny_tokenizer)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "d1").eval()
    assert dense.config.intermediate_size == width  # constant shape, whatever is unlocked
    assert find_memory(dense) is None
    torch.testing.assert_close(logits(dense, input_ids), out, atol=1e-5, rtol=0)
    assert (tmp_path / "d1" / "tokenizer.json").exists()
    with pytest.raises(FileExistsError, match="not empty"):
        mem.export_dense(tmp_path / "d1")
    with mem.suspended("fast"):
        no_fast = logits(model, input_ids)
        torch.testing.assert_close(logits(mem.dense_model(), input_ids), no_fast, atol=1e-5, rtol=0)


def test_dense_export_refuses_active_routed_level(tiny_tokenizer, input_ids):
    model, mem = make(tiny_tokenizer, "qwen2")
    mem.expand("fast")
    mem.expand("slow")
    with pytest.raises(ValueError, match="gate='sigmoid'"):
        mem.dense_state_dict()
    randomize(mem.parameters("fast"), seed=9)
    mem.suspend("slow")
    out = logits(model, input_ids)
    dense = mem.dense_model()
    assert dense.config.intermediate_size == model.config.intermediate_size + 8  # routed levels are not exported
    torch.testing.assert_close(logits(dense, input_ids), out, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- detach, copies, PEFT
def test_detach_restores_the_host(tiny_tokenizer, input_ids, tmp_path):
    model = build_model(tiny_tokenizer, arch="llama").eval()
    ref = logits(model, input_ids)
    names = {n for n, _ in model.named_parameters()}
    mem = attach_memory(model, small_config())
    mem.expand("fast")
    randomize(mem.parameters("fast"))
    detach_memory(model)
    assert {n for n, _ in model.named_parameters()} == names
    assert find_memory(model) is None and "save_pretrained" not in model.__dict__
    assert torch.equal(logits(model, input_ids), ref)
    model.save_pretrained(tmp_path / "plain")
    assert not has_memory(tmp_path / "plain")


def test_deepcopy_gets_its_own_memory(tiny_tokenizer, input_ids):
    model, mem = make(tiny_tokenizer, "llama")
    clone = copy.deepcopy(model)
    mem_c = find_memory(clone)
    assert mem_c is not None and mem_c is not mem and mem_c.model is clone
    mem_c.expand("fast")
    randomize(mem_c.parameters("fast"))
    assert mem.unlocked("fast") == 0
    assert not torch.allclose(logits(clone, input_ids), logits(model, input_ids), atol=1e-4)


def test_memory_under_a_peft_wrapper(tiny_tokenizer, input_ids):
    from peft import LoraConfig, get_peft_model

    model, mem = make(tiny_tokenizer, "llama")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    assert find_memory(peft_model) is mem
    names = mem.expand("slow", root=peft_model)
    assert all(n.startswith("base_model.model.model.layers.") for n in names)
    lora = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    mem.freeze_all_but(names + lora, root=peft_model)
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == set(names + lora)
    loss = peft_model(input_ids, labels=input_ids).loss
    loss.backward()
    assert {n for n, p in peft_model.named_parameters() if p.grad is not None} <= set(names + lora)
    assert all(dict(peft_model.named_parameters())[n].grad is not None for n in names if n.endswith("down_0"))


# --------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_smollm2_logits_preserved(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = tok(["The capital of France is", "Sleep helps memory because"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(**ids).logits
    mem = attach_memory(model)  # the default config: every layer, fast + slow levels
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, ref)
        mem.expand("fast")
        mem.expand("slow")
        torch.testing.assert_close(model(**ids).logits, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_per_row_view_gives_each_row_its_own_view(tiny_tokenizer, input_ids, arch):
    """`teacher_view(rows_suspend={"fast": mask})`: rows where mask is True compute as `teacher_view(suspend=
    ["fast"])`, the others as `teacher_view()`, in one forward, and in KV-cached generation too."""
    model, mem = make(tiny_tokenizer, arch)
    mem.expand("fast")
    randomize(mem.parameters("fast"), std=0.3, seed=3)
    mem.expand("slow")
    randomize(mem.parameters("slow", slots=[0]), std=0.3, seed=4)
    mem.suspend("fast")
    with mem.teacher_view():
        awake = logits(model, input_ids)
    with mem.teacher_view(suspend=["fast"]):
        long_term = logits(model, input_ids)
    assert not torch.allclose(awake, long_term, atol=1e-3)
    mask = torch.tensor([True, False])
    with mem.teacher_view(rows_suspend={"fast": mask}):
        mixed = logits(model, input_ids)
        generated = model.generate(input_ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(mixed[0], long_term[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], awake[1], atol=1e-5, rtol=0)
    with mem.teacher_view(suspend=["fast"]):
        alone = model.generate(input_ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(generated[:1], alone)
    assert mem.state.row_scale == {}  # the rows' views end with the block
    with mem.teacher_view(rows_suspend={"fast": torch.tensor([True, False, True])}), pytest.raises(RuntimeError, match="rows"):
        model(input_ids)


def test_copy_slot_warm_starts_a_slow_expert_as_the_fast_one(tiny_tokenizer, input_ids):
    """After copying the fast expert into a new routed slow slot with gate g and suspending the fast level, the model
    computes the awake model's function with the fast expert scaled by g (g -> 1: the same function)."""
    cfg = small_config(levels=[LevelConfig("fast", 1, 8, chunk_size=10), LevelConfig("slow", 3, 8, gate="sigmoid")])
    model, mem = make(tiny_tokenizer, "llama", cfg)
    mem.expand("fast")
    randomize(mem.parameters("fast"), std=0.2, seed=3)
    awake = logits(model, input_ids)
    mem.expand("slow")
    mem.copy_slot(("fast", 0), ("slow", 0), gate=1 - 1e-6)
    mem.suspend("fast")
    torch.testing.assert_close(logits(model, input_ids), awake, atol=1e-4, rtol=0)
    mem.copy_slot(("fast", 0), ("slow", 0), gate=0.5)
    half = logits(model, input_ids)
    assert not torch.allclose(half, awake, atol=1e-3)
    with pytest.raises(ValueError, match="same rank"):
        bad = small_config(levels=[LevelConfig("fast", 1, 4), LevelConfig("slow", 3, 8)])
        make(tiny_tokenizer, "llama", bad)[1].copy_slot(("fast", 0), ("slow", 0))
