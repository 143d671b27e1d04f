"Chapter 13: DPO and GRPO against TRL's own computation (the oracle), their behaviour, log-probs on a padded tiny Llama, preference pairs, bad input."

import copy
import inspect
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from speechllm_course.lm import tiny_llama_config
from speechllm_course.adapters import SpeechLM
from speechllm_course.lm import AUDIO_TOKEN
from speechllm_course.preference import (
    GRPO_LOSS_TYPES, GRPOObjective, answer_reward, batch_logprobs, completion_batch, dpo_batch, dpo_forward, dpo_loss, dpo_pairs,
    group_advantages, grpo_loss, preference_policy, reference_of, reply_batch, sample_completions, sample_replies, sequence_logprobs,
    token_logprobs, train_dpo, train_grpo, train_sft_baseline)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

ATOL = 1e-5
QUESTIONS = ["what is two plus three", "is a cat an animal", "how many animals are in this list: cat, apple, dog"]


def tiny_llm(tokenizer, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(tokenizer, hidden=32, layers=1, heads=2, kv_heads=1, max_len=128)).eval()


def random_logps(*shape, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return (-5 * torch.rand(*shape, generator=g) - 0.1).requires_grad_(requires_grad)


def ragged_mask(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    return (torch.arange(T)[None] < lengths[:, None]).long()


# ---------------------------------------------------------------------------------------------- the TRL oracle
# TRL >= 1.0 has no free-standing loss functions: DPOTrainer._compute_loss and GRPOTrainer._compute_loss /
# _generate_and_score_completions hold the formulas. We build real (tiny, CPU) trainers and feed those methods our
# tensors, replacing only the model's log-probs. Checked against TRL 1.0, 1.9 and 1.16 (TRL 0.x kept DPO in a
# `dpo_loss` method: skipped). If a later release moves these internals, the helpers below fail loudly.

def _trl_args(config_cls, tmp_path_factory, **kw):
    return config_cls(output_dir=str(tmp_path_factory.mktemp("trl")), use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                      logging_strategy="no", **kw)


@pytest.fixture(scope="module")
def dpo_trainer(tokenizer, tmp_path_factory):
    trl = pytest.importorskip("trl", minversion="1.0")
    from datasets import Dataset
    policy = tiny_llm(tokenizer, seed=1)
    data = Dataset.from_list([dict(prompt=[dict(role="user", content=q)], chosen=[dict(role="assistant", content="five")],
                                   rejected=[dict(role="assistant", content="six")]) for q in QUESTIONS])
    return trl.DPOTrainer(model=policy, ref_model=tiny_llm(tokenizer, seed=2), args=_trl_args(trl.DPOConfig, tmp_path_factory),
                          train_dataset=data, processing_class=tokenizer)


def trl_dpo(trainer, pc, pr, rc, rr, beta):
    "TRL's DPO loss and logged metrics for given sequence log-probs: a stand-in model returns them as one scored token each."
    n = pc.shape[0]
    zeros = torch.zeros(2 * n, 1)

    logps = torch.cat([pc, pr])[:, None]  # one scored token per row, whose log-prob is the sequence's

    def logps_model(**kwargs):
        # TRL 1.16 asks for per-token log-probs (a fused LM head); 1.0-1.9 take logits and log-softmaxes them.
        # Two-way logits [log p, log(1 - p)] give exactly log p for token 0, the label at position 1.
        logits = torch.stack([logps, torch.log1p(-torch.exp(logps))], dim=-1)  # (2B, 1, 2)
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(), log_sum_sq_probs=zeros,
                               logits=torch.cat([logits, torch.zeros_like(logits)], dim=1), aux_loss=None)
    trainer.beta, trainer.precompute_ref_logps = beta, True
    trainer._metrics = {m: defaultdict(list) for m in ("train", "eval")}
    trainer.model.eval()
    inputs = dict(input_ids=torch.zeros(2 * n, 2, dtype=torch.long), attention_mask=torch.ones(2 * n, 2, dtype=torch.long),
                  completion_mask=torch.ones(2 * n, 2, dtype=torch.long), ref_chosen_logps=rc, ref_rejected_logps=rr)
    loss = trainer._compute_loss(logps_model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["eval"].items()}


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_matches_trl(dpo_trainer, beta):
    B = 16
    pc, pr = random_logps(B, seed=1, requires_grad=True), random_logps(B, seed=2, requires_grad=True)
    rc, rr = random_logps(B, seed=3), random_logps(B, seed=4)
    ours = dpo_loss(pc, pr, rc, rr, beta=beta)
    ref_loss, metrics = trl_dpo(dpo_trainer, pc, pr, rc, rr, beta)
    torch.testing.assert_close(ours["loss"], ref_loss, atol=ATOL, rtol=0)
    assert abs(float(ours["chosen_rewards"].mean()) - metrics["rewards/chosen"]) < ATOL
    assert abs(float(ours["rejected_rewards"].mean()) - metrics["rewards/rejected"]) < ATOL
    assert abs(float(ours["reward_accuracy"]) - metrics["rewards/accuracies"]) < ATOL
    assert abs(float(ours["margin"]) - metrics["rewards/margins"]) < ATOL
    g_ours = torch.autograd.grad(ours["loss"], [pc, pr])
    g_trl = torch.autograd.grad(ref_loss, [pc, pr])
    for a, b in zip(g_ours, g_trl): torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_dpo_on_a_tiny_llama_matches_trl_end_to_end(dpo_trainer, tokenizer):
    "Same model, same reference, same pairs: our log-probs + loss equal TRL's whole DPO forward (its fused LM head included)."
    pairs = [dict(prompt=QUESTIONS[0], chosen="two plus three is five", rejected="six"),
             dict(prompt=QUESTIONS[1], chosen="yes", rejected="no it is not")]
    batch = dpo_batch(tokenizer, pairs)
    dpo_trainer.beta, dpo_trainer.precompute_ref_logps = 0.2, False
    dpo_trainer.model.eval()
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], completion_mask=(batch["labels"] != -100).long())
    ref_loss = dpo_trainer._compute_loss(dpo_trainer.model, inputs, return_outputs=False)
    ours = dpo_forward(dpo_trainer.model, dpo_trainer.ref_model, batch, beta=0.2)
    torch.testing.assert_close(ours["loss"], ref_loss, atol=ATOL, rtol=0)
    assert abs(float(ours["margin"])) > 1e-4  # a real difference between policy and reference, not 0 == 0


def test_token_logprobs_match_trls_fused_lm_head(tokenizer):
    pytest.importorskip("trl", minversion="1.0")
    import trl.trainer.utils as trl_utils
    model = tiny_llm(tokenizer)
    batch = reply_batch(tokenizer, QUESTIONS, ["five", "yes it is", "two"])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    if hasattr(trl_utils, "add_fused_lm_head"):  # TRL 1.16: a patched forward returns per-token log-probs, 0 where unscored
        fused = copy.deepcopy(model)
        trl_utils.add_fused_lm_head(fused)
        theirs = fused(**inputs, labels=batch["labels"], fused_lm_head=True).log_probs
    else:  # earlier: log-softmax of the logits at the next token
        with torch.no_grad():
            theirs = trl_utils.selective_log_softmax(model(**inputs).logits[:, :-1], batch["input_ids"][:, 1:])
        theirs = theirs.masked_fill(batch["labels"][:, 1:] == -100, 0.0)
    torch.testing.assert_close(token_logprobs(model, **batch)[:, 1:], theirs, atol=ATOL, rtol=0)


def _grpo_trainer(tokenizer, tmp_path_factory, G, n_groups):
    trl = pytest.importorskip("trl", minversion="1.0")
    from datasets import Dataset
    args = _trl_args(trl.GRPOConfig, tmp_path_factory, num_generations=G, num_generations_eval=G, per_device_train_batch_size=G * n_groups,
                     per_device_eval_batch_size=G * n_groups, max_completion_length=2, beta=0.0)
    data = Dataset.from_list([dict(prompt=[dict(role="user", content=q)], reward=0.0) for q in QUESTIONS])
    from_column = lambda prompts, completions, reward, **kw: [float(r) for r in reward]  # the reward we want, carried as a column
    return trl.GRPOTrainer(model=tiny_llm(tokenizer), reward_funcs=[from_column], args=args, train_dataset=data, processing_class=tokenizer)


@pytest.mark.parametrize("G", [2, 4])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl(tokenizer, tmp_path_factory, G, scale):
    n_groups = 3
    trainer = _grpo_trainer(tokenizer, tmp_path_factory, G, n_groups)
    trainer.scale_rewards = scale
    g = torch.Generator().manual_seed(G)
    rewards = (torch.rand(n_groups, G, generator=g) > 0.5).float()  # binary, rule-based
    rewards[0] = torch.tensor([1.0] + [0.0] * (G - 1))
    rewards[1] = 1.0  # every sample right: no signal
    if G == 4: rewards[2] = torch.rand(G, generator=g)  # and a continuous group
    inputs = [dict(prompt=[dict(role="user", content=QUESTIONS[i])], reward=float(rewards[i, j])) for i in range(n_groups) for j in range(G)]
    trainer.model.train()
    theirs = trainer._generate_and_score_completions(inputs)["advantages"]
    torch.testing.assert_close(group_advantages(rewards, scale=scale).flatten(), theirs, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def grpo_trainer(tokenizer, tmp_path_factory):
    return _grpo_trainer(tokenizer, tmp_path_factory, G=4, n_groups=2)


def trl_grpo(trainer, logp, old, ref, adv, mask, beta, loss_type, eps_low, eps_high, kl_ratio_correction):
    "TRL's GRPO loss and logged metrics for given per-token log-probs (the model's forward replaced by returning them)."
    B, T = logp.shape
    outs = (logp, torch.zeros_like(logp.detach()), None)  # (log-probs, entropies, MoE aux loss); TRL < 1.7 returns the first two
    n_out = 3 if "aux_loss" in inspect.getsource(type(trainer)._get_per_token_logps_and_entropies) else 2
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: outs[:n_out]
    trainer.loss_type, trainer.beta, trainer.epsilon_low, trainer.epsilon_high, trainer.max_completion_length = loss_type, beta, eps_low, eps_high, T
    trainer.args.use_bias_correction_kl = kl_ratio_correction  # TRL 1.16 defaults it to True (DeepSeek-V3.2); DeepSeekMath has no ρ there
    trainer._metrics = {m: defaultdict(list) for m in ("train", "eval")}
    trainer.model.eval()  # eval: no gradient-accumulation scaling, one batch is the whole generation batch
    inputs = dict(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.long),
                  completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=mask, advantages=adv,
                  old_per_token_logps=old, ref_per_token_logps=ref, num_items_in_batch=mask.sum())
    loss = trainer._compute_loss(trainer.model, inputs)
    del trainer._get_per_token_logps_and_entropies
    return loss, {k: v[-1] for k, v in trainer._metrics["eval"].items()}


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("beta,eps_high,kl_ratio_correction", [(0.0, None, False), (0.04, None, False), (0.04, 0.28, False), (0.04, None, True)])
def test_grpo_loss_matches_trl(grpo_trainer, loss_type, beta, eps_high, kl_ratio_correction):
    B, T, eps = 8, 7, 0.2
    logp = random_logps(B, T, seed=1, requires_grad=True)
    old = (logp.detach() + 0.3 * torch.randn(B, T, generator=torch.Generator().manual_seed(2)))  # off-policy: ratios clip
    ref = random_logps(B, T, seed=3)
    adv = group_advantages(torch.randint(0, 2, (2, 4), generator=torch.Generator().manual_seed(4)).float()).flatten()
    mask = ragged_mask(B, T, seed=5)
    ours = grpo_loss(logp, old, ref, adv, mask, beta=beta, epsilon=eps, epsilon_high=eps_high, loss_type=loss_type,
                     kl_ratio_correction=kl_ratio_correction)
    theirs, metrics = trl_grpo(grpo_trainer, logp, old, ref, adv, mask, beta, loss_type, eps, eps if eps_high is None else eps_high,
                               kl_ratio_correction)
    torch.testing.assert_close(ours["loss"], theirs, atol=ATOL, rtol=0)
    assert abs(float(ours["clip_fraction"]) - metrics["clip_ratio/region_mean"]) < ATOL
    assert 0 < float(ours["clip_fraction"]) < 1
    if beta: assert abs(float(ours["kl"]) - metrics["kl"]) < ATOL
    g_ours, = torch.autograd.grad(ours["loss"], logp)
    g_trl, = torch.autograd.grad(theirs, logp)
    torch.testing.assert_close(g_ours, g_trl, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- DPO behaviour
def test_dpo_loss_is_log2_when_the_policy_is_the_reference():
    pc, pr = random_logps(6, seed=1), random_logps(6, seed=2)
    out = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.3)
    assert abs(float(out["loss"]) - math.log(2)) < 1e-6
    assert float(out["margin"]) == 0 and float(out["reward_accuracy"]) == 0
    assert torch.equal(out["chosen_rewards"], torch.zeros(6))


def test_dpo_loss_closed_form_and_direction():
    ref = torch.tensor([-3.0]), torch.tensor([-4.0])
    out = dpo_loss(torch.tensor([-2.0]), torch.tensor([-4.5]), *ref, beta=0.5)
    z = 0.5 * ((-2.0 + 3.0) - (-4.5 + 4.0))  # β[(πc − rc) − (πr − rr)] = 0.75
    assert abs(float(out["loss"]) - math.log1p(math.exp(-z))) < 1e-6
    assert abs(float(out["chosen_rewards"]) - 0.5) < 1e-6 and abs(float(out["rejected_rewards"]) + 0.25) < 1e-6
    assert float(out["reward_accuracy"]) == 1 and abs(float(out["margin"]) - 0.75) < 1e-6
    losses = [float(dpo_loss(torch.tensor([c]), torch.tensor([-4.5]), *ref)["loss"]) for c in (-3.0, -2.0, -1.0)]
    assert losses[0] > losses[1] > losses[2]  # raising the chosen reply's log-prob lowers the loss
    losses = [float(dpo_loss(torch.tensor([-2.0]), torch.tensor([r]), *ref)["loss"]) for r in (-5.0, -4.0, -3.0)]
    assert losses[0] < losses[1] < losses[2]  # raising the rejected one's raises it


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    beta, B = 0.1, 5
    pc, pr = random_logps(B, seed=1, requires_grad=True), random_logps(B, seed=2, requires_grad=True)
    rc, rr = random_logps(B, seed=3, requires_grad=True), random_logps(B, seed=4, requires_grad=True)
    out = dpo_loss(pc, pr, rc, rr, beta=beta)
    out["loss"].backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # gradient descent raises chosen, lowers rejected
    z = beta * ((pc - rc) - (pr - rr)).detach()
    torch.testing.assert_close(pc.grad, -beta * torch.sigmoid(-z) / B)  # weighted by how wrong the implicit reward is
    torch.testing.assert_close(pr.grad, -pc.grad)
    assert rc.grad is None and rr.grad is None  # the reference is frozen


# ---------------------------------------------------------------------------------------------- GRPO behaviour
def test_group_advantages_are_zero_mean_unit_std_per_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0], [0.2, 0.9, 0.4, 0.4, 0.1]])
    adv = group_advantages(rewards)
    torch.testing.assert_close(adv.mean(1), torch.zeros(3), atol=1e-6, rtol=0)
    std = rewards.std(1)  # unbiased
    torch.testing.assert_close(adv[[0, 2]].std(1), std[[0, 2]] / (std[[0, 2]] + 1e-4))
    assert torch.equal(adv[1], torch.zeros(5))  # a group that all agrees teaches nothing
    assert (adv[0, [0, 3, 4]] > 0).all() and (adv[0, [1, 2]] < 0).all()
    torch.testing.assert_close(group_advantages(rewards, scale="none"), rewards - rewards.mean(1, keepdim=True))
    torch.testing.assert_close(group_advantages(rewards.tolist(), eps=0.0, scale="batch"), (rewards - rewards.mean(1, keepdim=True)) / rewards.std())


def test_grpo_on_policy_loss_and_gradient():
    "ρ = 1 on-policy: the loss is −mean(A) and each token's gradient is −A / (|o_i| · B) ('grpo')."
    B, T = 4, 6
    logp = random_logps(B, T, requires_grad=True)
    adv = torch.tensor([1.0, -0.5, 0.0, 2.0])
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 2 + [0] * 4, [1] * 5 + [0]])
    out = grpo_loss(logp, None, None, adv, mask, beta=0.0)
    assert abs(out["loss"].item() + float(adv.mean())) < 1e-6
    assert out["kl"] is None and float(out["clip_fraction"]) == 0
    out["loss"].backward()
    expect = -adv[:, None] / (mask.sum(1, keepdim=True) * B) * mask
    torch.testing.assert_close(logp.grad, expect)


def test_grpo_loss_types_weigh_tokens_differently():
    logp = torch.zeros(2, 4, requires_grad=True)
    adv, mask = torch.tensor([1.0, 1.0]), torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    grads = {}
    for lt in GRPO_LOSS_TYPES:
        grads[lt], = torch.autograd.grad(grpo_loss(logp, None, None, adv, mask, beta=0.0, loss_type=lt)["loss"], logp)
    assert grads["grpo"][1, 0] == 4 * grads["grpo"][0, 0]  # per-sequence mean: a short reply's token weighs more
    for lt in ("bnpo", "dapo", "dr_grpo"): assert grads[lt][1, 0] == grads[lt][0, 0]  # token-level: all equal
    assert abs(float(grads["bnpo"][0, 0]) + 1 / 5) < 1e-7 and abs(float(grads["dr_grpo"][0, 0]) + 1 / 8) < 1e-7


def test_grpo_clip_fraction_counts_the_tokens_whose_gradient_the_clip_stops():
    old = torch.zeros(2, 4)
    ratio = torch.tensor([[1.5, 1.1, 0.5, 1.5], [0.5, 1.5, 0.9, 0.5]])
    logp = ratio.log().requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    out = grpo_loss(logp, old, None, adv, mask, beta=0.0, epsilon=0.2)
    # A > 0 clips above 1.2: (0,0) yes, (0,1) no, (0,2) no (0.5 is below), (0,3) masked; A < 0 clips below 0.8: (1,0), (1,3) yes
    assert abs(float(out["clip_fraction"]) - 3 / 7) < 1e-6
    out["loss"].backward()
    stopped = torch.tensor([[1, 0, 0, 1], [1, 0, 0, 1]]).bool()
    assert (logp.grad[stopped] == 0).all() and (logp.grad[~stopped] != 0).all()
    assert abs(float(grpo_loss(logp, old, None, adv, mask, beta=0.0, epsilon=0.2, epsilon_high=0.6)["clip_fraction"]) - 2 / 7) < 1e-6


def test_grpo_kl_is_zero_at_the_reference_and_positive_elsewhere():
    logp, mask, adv = random_logps(3, 5), ragged_mask(3, 5), torch.tensor([1.0, 0.0, -1.0])
    assert float(grpo_loss(logp, None, logp.clone(), adv, mask)["kl"]) == 0
    out = grpo_loss(logp, None, random_logps(3, 5, seed=9), adv, mask)
    assert float(out["kl"]) > 0
    no_kl = grpo_loss(logp, None, random_logps(3, 5, seed=9), adv, mask, beta=0.0)
    assert float(out["loss"]) > float(no_kl["loss"])  # β·KL is a penalty


# ---------------------------------------------------------------------------------------------- log-probs and pairs on a tiny Llama
def test_sequence_logprobs_equal_a_hand_sum_with_right_padding(tokenizer):
    model = tiny_llm(tokenizer)
    replies = ["five", "yes a cat is an animal", "two"]
    batch = reply_batch(tokenizer, QUESTIONS, replies)
    assert (batch["attention_mask"][:, 0] == 1).all() and (batch["attention_mask"].sum(1) < batch["input_ids"].shape[1]).any()  # right-padded
    got = sequence_logprobs(model, **batch)
    for b in range(len(QUESTIONS)):
        n = int(batch["attention_mask"][b].sum())
        ids, labels = batch["input_ids"][b, :n], batch["labels"][b, :n]
        with torch.no_grad():
            lp = model(input_ids=ids[None]).logits[0].log_softmax(-1)  # alone, unpadded
        hand = sum(float(lp[t - 1, labels[t]]) for t in range(1, n) if labels[t] != -100)
        reply_ids = tokenizer(replies[b] + "<|end|>", add_special_tokens=False)["input_ids"]
        assert labels[labels != -100].tolist() == reply_ids  # exactly the reply and its end token are scored
        assert abs(got[b].item() - hand) < 1e-4
    per_token = token_logprobs(model, **batch)
    assert (per_token[batch["labels"] == -100] == 0).all()
    assert torch.allclose(per_token.sum(1), got)


def test_dpo_steps_on_a_tiny_llama_widen_the_margin(tokenizer):
    policy, pairs = tiny_llm(tokenizer), [dict(prompt=QUESTIONS[0], chosen="five", rejected="six"),
                                          dict(prompt=QUESTIONS[1], chosen="yes", rejected="no")]
    reference = copy.deepcopy(policy).requires_grad_(False)
    frozen = {k: v.clone() for k, v in reference.state_dict().items()}
    batch = dpo_batch(tokenizer, pairs)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    policy.train()
    history = []
    for _ in range(8):
        out = dpo_forward(policy, reference, batch, beta=0.5)
        history.append((float(out["loss"]), float(out["margin"])))
        opt.zero_grad(); out["loss"].backward(); opt.step()
    assert abs(history[0][0] - math.log(2)) < 1e-5 and history[0][1] == 0  # starts at the reference
    assert history[-1][1] > 0.5 and history[-1][0] < history[0][0] - 0.2
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in frozen.items())


def test_grpo_steps_on_a_tiny_llama_favour_the_rewarded_reply(tokenizer):
    policy = tiny_llm(tokenizer)
    reference = copy.deepcopy(policy).requires_grad_(False)
    batch = reply_batch(tokenizer, [QUESTIONS[0]] * 4, ["five", "six", "two plus three is five", "seven"])
    rewards = torch.tensor([[answer_reward(r, "five") for r in ("five", "six", "two plus three is five", "seven")]])
    adv = group_advantages(rewards).flatten()
    mask = (batch["labels"] != -100).long()
    with torch.no_grad():
        old = token_logprobs(policy, **batch)
        ref = token_logprobs(reference, **batch)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    for _ in range(4):
        out = grpo_loss(token_logprobs(policy, **batch), old, ref, adv, mask)
        opt.zero_grad(); out["loss"].backward(); opt.step()
    with torch.no_grad():
        gain = sequence_logprobs(policy, **batch) - old.sum(1)
    assert gain[[0, 2]].min() > 0 > gain[[1, 3]].max()
    assert float(out["kl"]) > 0


def test_dpo_pairs_from_sampled_replies():
    samples = [["five", "six", "it is five", "seven"],  # mixed: a pair
               ["yes", "yes it is", "yes"],  # all right: skipped
               ["one", "four", "zero"]]  # all wrong: skipped
    out = dpo_pairs(QUESTIONS, ["five", "yes", "two"], samples)
    assert out["questions"] == 3 and out["skipped"] == 2 and len(out["pairs"]) == 1
    p = out["pairs"][0]
    assert p["prompt"] == QUESTIONS[0] and p["chosen"] in ("five", "it is five") and p["rejected"] in ("six", "seven")
    assert (p["chosen_reward"], p["rejected_reward"]) == (1.0, 0.0)
    assert len(dpo_pairs(QUESTIONS[:1], ["five"], samples[:1], pairs_per_question=10)["pairs"]) == 4  # 2 right x 2 wrong
    assert dpo_pairs(QUESTIONS[:1], ["five"], samples[:1], seed=3) == dpo_pairs(QUESTIONS[:1], ["five"], samples[:1], seed=3)


def test_sample_replies_are_seeded_groups(tokenizer):
    model = tiny_llm(tokenizer)
    a = sample_replies(model, tokenizer, QUESTIONS[:2], n=3, max_new_tokens=5, seed=1)
    assert len(a) == 2 and all(len(g) == 3 and all(isinstance(r, str) for r in g) for g in a)
    assert a == sample_replies(model, tokenizer, QUESTIONS[:2], n=3, max_new_tokens=5, seed=1)
    assert a != sample_replies(model, tokenizer, QUESTIONS[:2], n=3, max_new_tokens=5, seed=2)


def test_dpo_batch_puts_chosen_rows_first(tokenizer):
    pairs = [dict(prompt=QUESTIONS[0], chosen="five", rejected="six"), dict(prompt=QUESTIONS[1], chosen="yes", rejected="no it is not")]
    batch = dpo_batch(tokenizer, pairs)
    assert batch["input_ids"].shape[0] == 4
    decoded = [tokenizer.decode(row[row != -100]) for row in batch["labels"]]
    assert [d.replace("<|end|>", "").strip() for d in decoded] == ["five", "yes", "six", "no it is not"]


# ---------------------------------------------------------------------------------------------- bad input
def test_dpo_bad_input_names_the_argument(tokenizer):
    x = random_logps(4)
    with pytest.raises(ValueError, match="policy_rejected_logps"): dpo_loss(x, random_logps(5), x, x)
    with pytest.raises(ValueError, match="policy_chosen_logps"): dpo_loss(random_logps(4, 2), x, x, x)
    with pytest.raises(ValueError, match="ref_chosen_logps"): dpo_loss(x, x, torch.tensor([1, 2, 3, 4]), x)
    with pytest.raises(ValueError, match="ref_rejected_logps"): dpo_loss(x, x, x, torch.tensor([0.0, float("nan"), 0.0, 0.0]))
    for beta in (-0.1, 0, float("inf"), True):
        with pytest.raises(ValueError, match="beta"): dpo_loss(x, x, x, x, beta=beta)
    with pytest.raises(ValueError, match=r"pairs\[1\].*different chosen and rejected"):
        dpo_batch(tokenizer, [dict(prompt="a", chosen="yes", rejected="no"), dict(prompt="b", chosen="five", rejected=" five ")])
    with pytest.raises(ValueError, match=r"pairs\[0\]"): dpo_batch(tokenizer, [dict(prompt="a", chosen="yes")])
    with pytest.raises(ValueError, match="answers"): dpo_pairs(QUESTIONS, ["five"], [["a", "b"]] * 3)
    with pytest.raises(ValueError, match=r"samples\[1\]"): dpo_pairs(QUESTIONS[:2], ["five", "yes"], [["a", "b"], ["a"]])
    flaky = iter([1.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="reward_fn"):  # the same text scored both 1 and 0
        dpo_pairs(QUESTIONS[:1], ["five"], [["five", "five"]], reward_fn=lambda r, a: next(flaky))


def test_group_advantages_bad_input_names_the_argument():
    with pytest.raises(ValueError, match=r"rewards.*G >= 2"): group_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match="rewards"): group_advantages(torch.ones(6))
    with pytest.raises(ValueError, match="rewards"): group_advantages(torch.ones(2, 3, 1))
    with pytest.raises(ValueError, match="rewards"): group_advantages(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="rewards"): group_advantages("high")
    with pytest.raises(ValueError, match="eps"): group_advantages(torch.ones(2, 2), eps=-1e-4)
    with pytest.raises(ValueError, match="scale"): group_advantages(torch.ones(2, 2), scale="global")


def test_grpo_loss_bad_input_names_the_argument():
    B, T = 3, 4
    logp, mask, adv = random_logps(B, T), torch.ones(B, T), torch.zeros(B)
    with pytest.raises(ValueError, match="advantages"): grpo_loss(logp, None, logp, torch.zeros(B, 1), mask)
    with pytest.raises(ValueError, match="advantages"): grpo_loss(logp, None, logp, torch.zeros(B + 1), mask)
    with pytest.raises(ValueError, match="completion_mask"): grpo_loss(logp, None, logp, adv, torch.ones(B, T + 1))
    with pytest.raises(ValueError, match="completion_mask"): grpo_loss(logp, None, logp, adv, 2 * torch.ones(B, T))
    with pytest.raises(ValueError, match="old_per_token_logps"): grpo_loss(logp, logp[:, :2], logp, adv, mask)
    with pytest.raises(ValueError, match="ref_per_token_logps"): grpo_loss(logp, None, None, adv, mask, beta=0.04)
    with pytest.raises(ValueError, match="ref_per_token_logps"): grpo_loss(logp, None, logp[:2], adv, mask)
    with pytest.raises(ValueError, match="per_token_logps"): grpo_loss(logp[0], None, None, adv, mask, beta=0.0)
    with pytest.raises(ValueError, match="per_token_logps"): grpo_loss(torch.full((B, T), float("nan")), None, None, adv, mask, beta=0.0)
    with pytest.raises(ValueError, match="beta"): grpo_loss(logp, None, logp, adv, mask, beta=-0.01)
    for eps in (0, -0.2, float("nan")):
        with pytest.raises(ValueError, match="epsilon"): grpo_loss(logp, None, logp, adv, mask, epsilon=eps)
    with pytest.raises(ValueError, match="epsilon_high"): grpo_loss(logp, None, logp, adv, mask, epsilon_high=0.0)
    with pytest.raises(ValueError, match="loss_type"): grpo_loss(logp, None, logp, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="max_completion_length"): grpo_loss(logp, None, logp, adv, mask, loss_type="dr_grpo", max_completion_length=0)
    out = grpo_loss(torch.where(mask.bool(), logp, torch.tensor(float("-inf"))), None, logp, adv, mask)  # padding may hold anything
    assert torch.isfinite(out["loss"])


def test_logprob_bad_input_names_the_argument(tokenizer):
    model = tiny_llm(tokenizer)
    batch = reply_batch(tokenizer, QUESTIONS[:2], ["five", "yes it is"])
    with pytest.raises(ValueError, match="labels"): token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"][:, :-1])
    with pytest.raises(ValueError, match="input_ids"): token_logprobs(model, batch["input_ids"][0], batch["attention_mask"][0], batch["labels"][0])
    padded_label = batch["labels"].clone()
    padded_label[batch["attention_mask"] == 0] = 5
    with pytest.raises(ValueError, match="labels.*padding"): sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], padded_label)
    with pytest.raises(ValueError, match="temperature"): token_logprobs(model, **batch, temperature=0)
    with pytest.raises(ValueError, match="replies"): reply_batch(tokenizer, QUESTIONS[:2], ["five"])
    with pytest.raises(ValueError, match="n"): sample_replies(model, tokenizer, QUESTIONS[:1], n=0)


# ---------------------------------------------------------------------------------------------- speech LMs and training
DIM = 6  # encoder feature size of the tiny SpeechLM


def tiny_speech_lm(tokenizer, seed=0):
    torch.manual_seed(seed)
    return SpeechLM.from_llm(tiny_llm(tokenizer, seed), tokenizer, "stack_mlp", DIM, adapter_kwargs=dict(stack=2)).eval()


def clips(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6 + 3 * i, DIM, generator=g) for i in range(n)]


def spoken_questions(n=4):
    return [dict(prompt=AUDIO_TOKEN, answer=a, features=f) for a, f in zip(["five", "yes", "two", "nine"][:n], clips(n))]


def test_speech_lm_logprobs_sum_to_its_own_loss(tokenizer):
    "The clips lengthen the sequence; the reply's log-probs gathered back must be the ones the model's loss uses."
    model = tiny_speech_lm(tokenizer)
    batch = reply_batch(tokenizer, [AUDIO_TOKEN, f"{AUDIO_TOKEN} answer briefly", AUDIO_TOKEN], ["five", "yes it is", "two"], clips(3))
    logps = batch_logprobs(model, batch)
    assert logps.shape == batch["input_ids"].shape and (logps[batch["labels"] == -100] == 0).all()
    with torch.no_grad(): nll = model(**batch).loss * (batch["labels"] != -100).sum()
    torch.testing.assert_close(-logps.sum(), nll, atol=1e-4, rtol=1e-5)
    one = reply_batch(tokenizer, [f"{AUDIO_TOKEN} answer briefly"], ["yes it is"], clips(3)[1:2])  # no padding: the same numbers
    torch.testing.assert_close(batch_logprobs(model, one).sum(), logps[1].sum(), atol=1e-5, rtol=0)


def test_speech_lm_logprobs_need_the_reply_after_the_audio(tokenizer):
    model = tiny_speech_lm(tokenizer)
    batch = reply_batch(tokenizer, [AUDIO_TOKEN], ["five"], clips(1))
    labels = batch["labels"].clone()
    labels[0, 1] = batch["input_ids"][0, 1]  # a prompt token before the clip
    with pytest.raises(ValueError, match="labels.*audio placeholder"): token_logprobs(model, batch["input_ids"], batch["attention_mask"], labels,
                                                                                     speech_features=batch["speech_features"], speech_lengths=batch["speech_lengths"])
    with pytest.raises(ValueError, match="features"): reply_batch(tokenizer, [AUDIO_TOKEN], ["five"])  # a placeholder and no clip
    with pytest.raises(ValueError, match="prompts"): reply_batch(tokenizer, ["no audio here"], ["five"], clips(1))
    with pytest.raises(ValueError, match="speech_features"): token_logprobs(tiny_llm(tokenizer), **{**reply_batch(tokenizer, ["hi"], ["five"]), "speech_features": torch.zeros(1, 2, DIM)})


def test_sampled_completions_are_seeded_and_never_hold_a_placeholder(tokenizer):
    model = tiny_speech_lm(tokenizer)
    audio_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    with torch.no_grad(): model.llm.lm_head.bias = None; model.llm.lm_head.weight[audio_id] += 50.0  # make the placeholder the likeliest token
    a = sample_completions(model, tokenizer, [AUDIO_TOKEN] * 2, 3, features=clips(2), max_new_tokens=6, seed=3)
    assert a == sample_completions(model, tokenizer, [AUDIO_TOKEN] * 2, 3, features=clips(2), max_new_tokens=6, seed=3)
    assert len(a) == 2 and all(len(g) == 3 for g in a) and not any(audio_id in c for g in a for c in g)
    rows = completion_batch(tokenizer, [AUDIO_TOKEN] * 6, [c for g in a for c in g], [f for f in clips(2) for _ in range(3)])
    assert torch.isfinite(batch_logprobs(model, rows)).all()


def test_lora_policy_starts_at_its_reference_and_leaves_it_untouched(tokenizer):
    policy = preference_policy(tiny_speech_lm(tokenizer), r=4)
    assert {n for n, p in policy.named_parameters() if p.requires_grad} and all("lora_" in n for n, p in policy.named_parameters() if p.requires_grad)
    pairs = [dict(prompt=AUDIO_TOKEN, chosen=c, rejected=r, features=f) for (c, r), f in zip([("five", "six"), ("yes", "no")], clips(2))]
    batch = dpo_batch(tokenizer, pairs)
    with torch.no_grad(), reference_of(policy) as ref: before = batch_logprobs(ref, batch)
    assert abs(dpo_forward(policy, None, batch, beta=0.1)["loss"].item() - math.log(2)) < 1e-6
    hist = train_dpo(policy, tokenizer, pairs, steps=6, batch_size=2, lr=1e-2, beta=0.5, progress=False, warmup=0)
    assert hist.extras["margin"][-1] > 0 and hist.losses[-1] < math.log(2)
    with torch.no_grad(), reference_of(policy) as ref: after = batch_logprobs(ref, batch)
    torch.testing.assert_close(after, before, atol=0, rtol=0)  # LoRA off = the starting model, exactly
    assert not torch.allclose(batch_logprobs(policy, batch), before)


def test_grpo_objective_rewards_and_logs(tokenizer):
    policy = preference_policy(tiny_speech_lm(tokenizer), r=4)
    objective = GRPOObjective(tokenizer, reward_fn=lambda reply, answer: float(len(reply) % 2), group_size=3, max_new_tokens=4)
    from speechllm_course.preference import grpo_collate
    batch = grpo_collate([dict(q, _index=i) for i, q in enumerate(spoken_questions(2))])
    out = objective(policy, batch)
    assert {"loss", "reward", "mixed_groups", "clip_fraction", "kl", "reply_tokens"} <= set(out) and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert float(out["mixed_groups"]) > 0  # some group has both rewards, so the loss has a gradient ...
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in policy.named_parameters() if "lora_B" in n)  # ... reaching the LoRA
    with pytest.raises(ValueError, match="group_size"): GRPOObjective(tokenizer, group_size=1)
    with pytest.raises(ValueError, match="loss_type"): GRPOObjective(tokenizer, loss_type="ppo")
    with pytest.raises(ValueError, match="answers"): GRPOObjective(tokenizer, group_size=2).rewards([["a", "b"]], ["a", "b"])  # 2 answers, 1 group
    with pytest.raises(ValueError, match="replies"): GRPOObjective(tokenizer, group_size=3).rewards([["a", "b"]], ["a"])
    with pytest.raises(ValueError, match="reward_fn"): GRPOObjective(tokenizer, reward_fn=lambda r, a: float("nan"), group_size=2).rewards([["a", "b"]], ["a"])


def test_grpo_objective_seed_decides_its_samples(tokenizer):
    "Chapter 13 trains GRPO with several seeds: the same seed draws the same groups, another seed other groups, on the same batch."
    from speechllm_course.preference import grpo_collate
    policy = preference_policy(tiny_speech_lm(tokenizer), r=4)
    batch = grpo_collate([dict(q, _index=i) for i, q in enumerate(spoken_questions(2))])
    def replies_of(seed):
        seen = []
        objective = GRPOObjective(tokenizer, reward_fn=lambda reply, answer: seen.append(reply) or 0.0, group_size=4, max_new_tokens=6, seed=seed)
        with torch.no_grad(): objective(policy, batch)
        return seen
    first = replies_of(0)
    assert len(first) == 2 * 4 and replies_of(0) == first
    assert replies_of(1) != first


def _lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_grpo_resumes_after_a_crash_exactly(tokenizer, tmp_path):
    "A run killed after its step-2 checkpoint and started again ends where the uninterrupted run ends (optimiser state included)."
    reward = lambda reply, answer: float(len(reply.split()) % 2)
    def run(ckpt, crash_after=None):
        calls = iter(range(10 ** 6))
        def flaky(reply, answer):
            if crash_after is not None and next(calls) >= crash_after: raise KeyboardInterrupt("killed")
            return reward(reply, answer)
        policy = preference_policy(tiny_speech_lm(tokenizer), r=4)
        objective = GRPOObjective(tokenizer, reward_fn=flaky, group_size=2, max_new_tokens=4, beta=0.04)
        train_grpo(policy, tokenizer, spoken_questions(), steps=4, batch_size=2, lr=5e-2, objective=objective, progress=False,
                   ckpt_dir=str(ckpt), ckpt_every=2, warmup=0)
        return _lora_state(policy)
    straight = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt): run(tmp_path / "b", crash_after=2 * 2 * 2 + 1)  # dies inside step 3
    resumed = run(tmp_path / "b")
    assert straight.keys() == resumed.keys()
    for k in straight: torch.testing.assert_close(resumed[k], straight[k], atol=1e-6, rtol=0)
    assert any(v.abs().sum() > 0 for k, v in straight.items() if "lora_B" in k)  # it trained


def test_sft_then_save_and_load_keeps_the_policy(tokenizer, tmp_path):
    policy = preference_policy(tiny_speech_lm(tokenizer), r=4)
    data = [dict(prompt=AUDIO_TOKEN, reply=q["answer"], features=q["features"]) for q in spoken_questions()]
    hist = train_sft_baseline(policy, tokenizer, data, steps=8, batch_size=4, lr=1e-2, progress=False, warmup=0)
    assert hist.losses[-1] < hist.losses[0]
    batch = reply_batch(tokenizer, [AUDIO_TOKEN] * 4, [q["answer"] for q in spoken_questions()], [q["features"] for q in spoken_questions()])
    with torch.no_grad(): trained = batch_logprobs(policy, batch)
    policy.merge_lora().save_pretrained(tmp_path / "policy")
    loaded = SpeechLM.from_pretrained(tmp_path / "policy").eval()
    with torch.no_grad(): torch.testing.assert_close(batch_logprobs(loaded, batch), trained, atol=1e-5, rtol=0)


def test_preference_bad_input_names_the_argument(tokenizer):
    with pytest.raises(ValueError, match="target_modules"): preference_policy(tiny_speech_lm(tokenizer), target_modules=("qkv_proj",))
    with pytest.raises(ValueError, match="reference"):  # no LoRA: no reference to fall back on
        dpo_forward(tiny_llm(tokenizer), None, dpo_batch(tokenizer, [dict(prompt="hi", chosen="yes", rejected="no")]))
    with pytest.raises(ValueError, match="pairs"): dpo_batch(tokenizer, [dict(prompt=AUDIO_TOKEN, chosen="a", rejected="b", features=clips(1)[0]),
                                                                         dict(prompt="hi", chosen="a", rejected="b")])
    with pytest.raises(ValueError, match="examples"): train_grpo(tiny_speech_lm(tokenizer), tokenizer, [], steps=1)
    with pytest.raises(ValueError, match="examples"): train_sft_baseline(tiny_speech_lm(tokenizer), tokenizer, [dict(prompt="hi")], steps=1)
    with pytest.raises(ValueError, match="beta"): train_dpo(tiny_speech_lm(tokenizer), tokenizer, [dict(prompt="hi", chosen="a", rejected="b")], steps=1, beta=0)
