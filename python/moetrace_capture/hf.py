"""Every moetrace stage of a Hugging Face transformers Qwen3, Qwen3-MoE,
Mixtral, Qwen2-MoE, DeepSeek-V3 or gpt-oss model, captured while it generates (needs torch and transformers; the rest
of the package needs only numpy).

    from transformers import AutoModelForCausalLM
    from moetrace_capture import hf
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="eager")
    hf.record(model, "hf-capture", prompt=[1, 17, 423], generate=8)

Then `moetrace diff hf-capture <moetrace capture>` compares it stage by
stage. What no module returns on its own is recomputed in the hooks with
the model's own functions and dtype: the q/k/v concatenation, QK-norm's
output, q and k after RoPE, the attention scores (masked entries 0, as
moetrace writes them), the router's top-k and renormalised weights, and
the per-expert gate, up, SwiGLU and down projections, the projections
before their bias, and a shared expert's stages. The attention
implementation must return its probabilities (`attn_implementation=
"eager"`).
"""

import math

import torch

from .writer import Capture


def record(model, out_dir, prompt, generate=1, backend="hf", source=None):
    """Greedy generation from `prompt` (token ids): step 0 is the prompt,
    then one step per generated token, each captured at every stage.
    Returns the generated ids (`generate` of them; step 0 runs even when
    `generate` is 0)."""
    config = model.config.to_dict()
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    prompt = [int(t) for t in prompt]
    device = next(model.parameters()).device
    generated = []
    with Capture(out_dir, config=config, prompt=prompt, backend=backend, dtype=dtype, source=source) as cap:
        past, tokens, start = None, prompt, 0
        keys = {}  # per layer: the keys after RoPE of every position so far
        for step in range(max(1, generate)):
            cap.begin_step(step, start, tokens)
            recorder = _StepRecorder(model, cap, step, start, len(tokens), keys)
            ids = torch.tensor([tokens], device=device)
            with torch.no_grad(), recorder:
                out = model(ids, past_key_values=past, use_cache=True, output_attentions=True)
            recorder.finish(out)
            past = out.past_key_values
            next_id = int(out.logits[0, -1].argmax())
            generated.append(next_id)
            start += len(tokens)
            tokens = [next_id]
        cap.generated = generated[:generate]
    return generated[:generate]


class _StepRecorder:
    """Hooks on one forward step; `finish` derives the rest and saves."""

    def __init__(self, model, cap, step, start, t_len, keys):
        self.model, self.cap, self.step, self.start, self.t = model, cap, step, start, t_len
        self.inner = model.model
        self.config = model.config
        self.got = {}
        self.handles = []
        self.kv = keys  # per layer, extended by this step (for the scores)

    def _put(self, key, value):
        self.got[key] = tuple(v.detach() for v in value) if isinstance(value, tuple) else value.detach()

    def __enter__(self):
        m = self.inner
        hook = self.handles.append
        hook(m.embed_tokens.register_forward_hook(lambda mod, i, o: self._put("embedding", o[0])))
        for li, layer in enumerate(m.layers):
            def out_hook(key, li=li):
                return lambda mod, i, o: self._put((li, key), (o[0] if isinstance(o, tuple) else o)[0])

            attn = layer.self_attn
            hook(layer.input_layernorm.register_forward_hook(out_hook("attn_norm")))
            for name in ("q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "q_a_proj", "q_a_layernorm", "q_b_proj",
                         "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj"):
                if getattr(attn, name, None) is not None:  # q_norm and k_norm: Qwen3; the rest: DeepSeek's MLA
                    hook(getattr(attn, name).register_forward_hook(out_hook(name)))
            hook(attn.o_proj.register_forward_pre_hook(lambda mod, i, li=li: self._put((li, "attention"), i[0][0])))
            hook(attn.o_proj.register_forward_hook(out_hook("attn_out")))
            hook(layer.post_attention_layernorm.register_forward_hook(out_hook("ffn_norm")))
            hook(layer.mlp.register_forward_hook(out_hook("mlp_out")))
            hook(layer.register_forward_hook(out_hook("post_ffn_residual")))
            gate = getattr(layer.mlp, "gate", None) or getattr(layer.mlp, "router", None)  # router: gpt-oss
            if gate is not None and hasattr(layer.mlp, "experts"):
                hook(gate.register_forward_hook(lambda mod, i, o, li=li: self._put((li, "router"), o)))
        hook(m.norm.register_forward_hook(lambda mod, i, o: self._put("final_norm", o[0])))
        hook(self.model.lm_head.register_forward_hook(lambda mod, i, o: self._put("lm_head", o[0])))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False

    def finish(self, out):
        c, got, save = self.config, self.got, self.cap.save
        step, t_len, start = self.step, self.t, self.start
        nh, nkv = c.num_attention_heads, c.num_key_value_heads
        hd = getattr(c, "head_dim", None) or c.hidden_size // nh
        save(step, None, "embedding", got["embedding"])
        positions = torch.arange(start, start + t_len, device=got["embedding"].device)[None]
        cos, sin = self.inner.rotary_emb(got["embedding"][None], positions)
        rope = _rotary(self.model)
        for li, layer in enumerate(self.inner.layers):
            g = {k[1]: v for k, v in got.items() if isinstance(k, tuple) and k[0] == li}
            attn = layer.self_attn
            save(step, li, "attn_norm", g["attn_norm"])
            if "kv_a_proj_with_mqa" in g:
                self._mla(li, attn, g, cos, sin)
            else:
                self._qkv_attention(li, attn, g, cos, sin, rope, nh, nkv, hd)
            probs = out.attentions[li][0]
            p_len = start + t_len
            if probs.shape[-1] < p_len:
                # A sliding layer's cache keeps only the window's last
                # positions (gpt-oss): its probabilities are of the last
                # keys; the positions before them are masked, 0.
                probs = torch.nn.functional.pad(probs, (p_len - probs.shape[-1], 0))
            save(step, li, "attn_softmax", probs)
            save(step, li, "attention", g["attention"])
            save(step, li, "attn_out", g["attn_out"])
            residual_in = got["embedding"] if li == 0 else got[(li - 1, "post_ffn_residual")]
            save(step, li, "post_attn_residual", residual_in + g["attn_out"])
            x = g["ffn_norm"]
            save(step, li, "ffn_norm", x)
            if "router" in g:
                self._moe(li, layer, x, g)
            else:
                mlp = layer.mlp
                gate, up = mlp.gate_proj(x), mlp.up_proj(x)
                silu = mlp.act_fn(gate)
                save(step, li, "ffn_gate", gate)
                save(step, li, "ffn_up", up)
                save(step, li, "ffn_silu", silu)
                save(step, li, "ffn_swigl", silu * up)
                save(step, li, "ffn_out", g["mlp_out"])
            save(step, li, "post_ffn_residual", g["post_ffn_residual"])
        save(step, None, "final_norm", got["final_norm"])
        save(step, None, "lm_head", got["lm_head"])

    def _scores(self, li, q_heads, k_post, scaling, k_heads_of):
        """Masked scores [nh, T, P] of this step's queries against every
        cached key (this step's appended), as moetrace writes them. A
        layer with a sliding window (gpt-oss) also masks what the window
        hides (transformers' `kv_idx > q_idx - sliding_window`), saves
        each row's first and last visible position (attn_window) and, with
        attention sinks, the sink's share of each softmax row (attn_sink:
        exp(sink) over the row's denominator with the sink in it)."""
        start, t_len = self.start, self.t
        keys = torch.cat([self.kv.get(li, k_post[:0]), k_post], dim=0)
        self.kv[li] = keys
        scores = q_heads @ k_heads_of(keys).transpose(1, 2) * scaling
        p_len = keys.shape[0]
        dev = scores.device
        query = start + torch.arange(t_len, device=dev)
        position = torch.arange(p_len, device=dev)
        mask = position[None, :] > query[:, None]
        attn = self.inner.layers[li].self_attn
        window = getattr(attn, "sliding_window", None)
        if window is not None:
            mask = mask | (position[None, :] <= query[:, None] - window)
        if hasattr(attn, "layer_type"):  # gpt-oss: every layer says which positions it sees
            first = (query - window + 1).clamp(min=0) if window is not None else torch.zeros_like(query)
            self.cap.save(self.step, li, "attn_window", torch.stack([first, query], dim=-1).to(torch.int32))
        self.cap.save(self.step, li, "attn_scores", scores.masked_fill(mask[None], 0.0))
        sinks = getattr(attn, "sinks", None)
        if sinks is not None:
            logits = torch.cat([scores.masked_fill(mask[None], float("-inf")),
                                sinks.to(scores.dtype)[:, None, None].expand(-1, t_len, 1)], dim=-1)
            self.cap.save(self.step, li, "attn_sink", torch.softmax(logits, dim=-1)[..., -1])

    def _qkv_attention(self, li, attn, g, cos, sin, rope, nh, nkv, hd):
        """q, k, v projections through the scores (every family but MLA)."""
        step, save, t_len = self.step, self.cap.save, self.t
        projected = torch.cat([g["q_proj"], g["k_proj"], g["v_proj"]], dim=-1)
        if attn.q_proj.bias is not None:  # Qwen2-MoE: the projections, then their bias
            plain = [torch.nn.functional.linear(g["attn_norm"], getattr(attn, f"{x}_proj").weight) for x in "qkv"]
            save(step, li, "qkv_matmul", torch.cat(plain, dim=-1))
            save(step, li, "qkv_bias", projected)
        else:
            save(step, li, "qkv_matmul", projected)
        if "q_norm" in g:
            qn, kn = g["q_norm"].reshape(t_len, nh, hd), g["k_norm"].reshape(t_len, nkv, hd)
            save(step, li, "qk_norm", torch.cat([qn.reshape(t_len, -1), kn.reshape(t_len, -1)], dim=-1))
        else:  # no q/k norm: RoPE reads the projections
            qn, kn = g["q_proj"].reshape(t_len, nh, hd), g["k_proj"].reshape(t_len, nkv, hd)
        qr, kr = rope(qn.transpose(0, 1)[None], kn.transpose(0, 1)[None], cos, sin)
        q_post, k_post = qr[0].transpose(0, 1).reshape(t_len, -1), kr[0].transpose(0, 1).reshape(t_len, -1)
        save(step, li, "q_post_rope", q_post)
        save(step, li, "k_post_rope", k_post)
        self._scores(li, qr[0], k_post, 1 / math.sqrt(hd),
                     lambda keys: keys.reshape(-1, nkv, hd).transpose(0, 1).repeat_interleave(nh // nkv, dim=0))

    def _mla(self, li, attn, g, cos, sin):
        """DeepSeek's multi-head latent attention through the scores: the
        compressed query and latent, kv_b's expansion of this step's
        positions (its hook saw the whole cache), the rope columns rotated
        as the module rotates them, MLA's softmax scale."""
        step, save, t_len = self.step, self.cap.save, self.t
        nh, dn, dr, dv = attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim
        if "q_a_proj" in g:
            save(step, li, "mla_q_a", g["q_a_proj"])
            save(step, li, "mla_q_a_norm", g["q_a_layernorm"])
            q = g["q_b_proj"]
        else:
            q = g["q_proj"]
        save(step, li, "mla_q", q)
        kv_a = g["kv_a_proj_with_mqa"]
        save(step, li, "mla_kv_a", kv_a)
        save(step, li, "mla_kv_a_norm", g["kv_a_layernorm"])
        kv_b = g["kv_b_proj"].reshape(-1, g["kv_b_proj"].shape[-1])[-t_len:]  # [1, P, w]: the whole cache
        save(step, li, "mla_kv_b", kv_b)
        module = __import__(type(attn).__module__, fromlist=["apply_rotary_pos_emb"])
        rotate = (module.apply_rotary_pos_emb_interleave if self.config.rope_interleave
                  else module.apply_rotary_pos_emb)
        q_heads = q.reshape(t_len, nh, dn + dr).transpose(0, 1)[None]
        k_rot = kv_a[:, attn.kv_lora_rank:].reshape(1, 1, t_len, dr)
        q_rot, k_rot = rotate(q_heads[..., dn:], k_rot, cos, sin)
        q_post = torch.cat([q_heads[..., :dn], q_rot], dim=-1)[0]  # [nh, T, dqk]
        k_nope = kv_b.reshape(t_len, nh, dn + dv)[..., :dn]
        k_post = torch.cat([k_nope, k_rot[0, 0][:, None, :].expand(t_len, nh, dr)], dim=-1).reshape(t_len, -1)
        save(step, li, "q_post_rope", q_post.transpose(0, 1).reshape(t_len, -1))
        save(step, li, "k_post_rope", k_post)
        self._scores(li, q_post, k_post, attn.scaling, lambda keys: keys.reshape(-1, nh, dn + dr).transpose(0, 1))

    def _moe(self, li, layer, x, g):
        step, save = self.step, self.cap.save
        logits, weights, ids = g["router"]
        save(step, li, "moe_router_logits", logits)
        bias = getattr(getattr(layer.mlp, "gate", None), "e_score_correction_bias", None)
        if bias is not None:  # DeepSeek: what chooses the groups and the experts
            choice = torch.sigmoid(logits) + bias
            save(step, li, "moe_router_choice", choice)
            # The group choice as DeepseekV3MoE.route_tokens_to_experts makes
            # it: each group's two best choice scores summed, the best
            # topk_group groups kept (saved best first).
            gate = layer.mlp.gate
            n_group = getattr(gate, "num_group", None) or getattr(gate, "n_group", None) or layer.mlp.n_group
            topk_group = getattr(gate, "topk_group", None) or layer.mlp.topk_group
            group_scores = choice.view(choice.shape[0], n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
            save(step, li, "moe_router_group_scores", group_scores)
            save(step, li, "moe_router_groups", group_scores.topk(topk_group, dim=-1, sorted=True)[1].to(torch.int32))
        save(step, li, "moe_router", weights)
        save(step, li, "moe_router_indices", ids.to(torch.int32))
        experts = layer.mlp.experts
        if hasattr(experts, "_apply_gate"):  # gpt-oss: biases, interleaved gate/up, the clamped SwiGLU
            return self._oss_experts(li, experts, x, ids, g)
        gate_w, up_w, down_w = _expert_weights(experts, ids)
        gate = torch.einsum("th,tkih->tki", x, gate_w)
        up = torch.einsum("th,tkih->tki", x, up_w)
        act = getattr(experts, "act_fn", None) or torch.nn.functional.silu
        swigl = act(gate) * up
        down = torch.einsum("tki,tkhi->tkh", swigl, down_w)
        save(step, li, "moe_expert_gate", gate)
        save(step, li, "moe_expert_up", up)
        save(step, li, "moe_expert_swigl", swigl)
        save(step, li, "moe_expert_out", down)
        # Qwen2-MoE's shared_expert (weighted by a sigmoid gate) or
        # DeepSeek's shared_experts (one MLP, ungated).
        shared = getattr(layer.mlp, "shared_expert", None) or getattr(layer.mlp, "shared_experts", None)
        if shared is not None:
            s_gate, s_up = shared.gate_proj(x), shared.up_proj(x)
            s_swigl = shared.act_fn(s_gate) * s_up
            save(step, li, "moe_shared_gate", s_gate)
            save(step, li, "moe_shared_up", s_up)
            save(step, li, "moe_shared_swigl", s_swigl)
            save(step, li, "moe_shared_out", shared.down_proj(s_swigl))
            if getattr(layer.mlp, "shared_expert_gate", None) is not None:
                logit = layer.mlp.shared_expert_gate(x)
                save(step, li, "moe_shared_logit", logit)
                save(step, li, "moe_shared_weight", torch.sigmoid(logit))
        save(step, li, "moe_ffn_out", g["mlp_out"])

    def _oss_experts(self, li, experts, x, ids, g):
        step, save = self.step, self.cap.save
        gate, up, clamped, swigl, down = _oss_experts_stages(experts, x, ids)
        for name, value in (("gate", gate), ("up", up), ("clamp", clamped), ("swigl", swigl), ("out", down)):
            save(step, li, f"moe_expert_{name}", value)
        save(step, li, "moe_ffn_out", g["mlp_out"])


def _oss_experts_stages(experts, x, ids):
    """gpt-oss's per-expert stages from its experts module (transposed
    `gate_up_proj` [E, H, 2I] with gate in the even columns, up in the
    odd, biases; the module's own `_apply_gate`)."""
    e = ids.long()
    gate_up = torch.einsum("th,tkhi->tki", x, experts.gate_up_proj[e]) + experts.gate_up_proj_bias[e]
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    limit = experts.limit
    clamped = torch.cat([gate.clamp(max=limit), up.clamp(min=-limit, max=limit)], dim=-1)
    swigl = experts._apply_gate(gate_up)
    down = torch.einsum("tki,tkih->tkh", swigl, experts.down_proj[e]) + experts.down_proj_bias[e]
    return gate, up, clamped, swigl, down


def _expert_weights(experts, ids):
    """Per (token, slot) gate, up and down weights, [T, k, I, H] / [T, k, H, I],
    from transformers 5's fused expert tensors or from per-expert modules."""
    if hasattr(experts, "gate_up_proj"):
        gate_up = experts.gate_up_proj[ids.long()]  # [T, k, 2I, H]
        inter = gate_up.shape[-2] // 2
        return gate_up[..., :inter, :], gate_up[..., inter:, :], experts.down_proj[ids.long()]
    rows = [[experts[int(e)] for e in row] for row in ids]
    stack = lambda name: torch.stack([torch.stack([getattr(e, name).weight for e in r]) for r in rows])  # noqa: E731
    return stack("gate_proj"), stack("up_proj"), stack("down_proj")


def _rotary(model):
    """The model family's apply_rotary_pos_emb."""
    module = __import__(type(model).__module__, fromlist=["apply_rotary_pos_emb"])
    return module.apply_rotary_pos_emb


__all__ = ["record"]
