"""A tinylm model as an lm-evaluation-harness model: :class:`HarnessModel` (a ``lm_eval.api.model.TemplateLM``).

The harness asks for three things; each comes from tinylm's own forward pass and batched KV-cache
generation (``model/generate.py``), with the numbers ``lm_eval --model hf`` gives on the ``bin/export
--format hf`` folder of the same checkpoint:

- ``loglikelihood`` (context, continuation): the harness's own ``TemplateLM`` splits the pair into
  tokens (trailing context spaces move to the continuation; an empty context becomes the prefix token);
  :meth:`HarnessModel._loglikelihood_tokens` runs ``(context + continuation)[-(max_length + 1):][:-1]``,
  right-padded, longest first, through the model and sums the continuation's log-softmax entries, with
  "is greedy" = every continuation token is the argmax.
- ``loglikelihood_rolling`` (text): the harness's rolling windows (``max_length`` tokens, the prefix token
  first, each token predicted once), summed per text.
- ``generate_until`` (context, kwargs): contexts left-truncated to ``max_length - max_gen_toks``, decoded
  together (greedy unless ``do_sample``) until every row has met a stop id (the export's
  ``generation_config`` eos ids) or one of the ``until`` strings (the eos string added), then decoded
  without special tokens and cut at the first stop string (the harness's own ``postprocess_generated_text``).

The special tokens are those the export writes (``serve.export.tokenizer_files``): its eos token
(``<|im_end|>`` by default) is the harness's end-of-text id, its bos (else eos) the prefix token of empty
contexts and rolling windows; ``max_length`` is the model's context.

Text is text, with one stated exception: the harness hands over strings that already hold rendered chat
templates (``--apply-chat-template``), so :meth:`HarnessModel.tok_encode` tokenizes them the way the
transformers model does, special-token strings parsed into their ids; everywhere else in tinylm content
is encoded literally. ``apply_chat_template`` renders with tinylm's template (``core.chat_template``),
and a final assistant turn is continued (no end-of-turn) when no generation prompt is asked for, as
transformers' ``continue_final_message`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from core.chat_template import render_text
from model.generate import Generation
from serve.export import tokenizer_files
from serve.source_args import ToolError
from train.loading import LoadedModel

DEFAULT_MAX_GEN_TOKS = 256  # the harness's HF model's default answer length
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for continue_final_message

TokenRequest = tuple[Any, list[int], list[int]]  # (request strings or None, context ids, continuation ids)


class HarnessModel(TemplateLM):
    """``loaded`` as a harness model; ``batch_size`` rows per forward pass / generation batch; ``progress``:
    progress bars."""

    backend = "causal"

    def __init__(self, loaded: LoadedModel, batch_size: int = 8, device: torch.device | str = "cpu",
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, progress: bool = True) -> None:
        super().__init__()
        self.loaded = loaded
        self.net = loaded.model.to(device).eval()
        self._device = torch.device(device)
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.progress = progress
        self.max_length = loaded.config.max_position_embeddings
        files = tokenizer_files(loaded.tokenizer)
        self.encoder = loaded.tokenizer.tokenizer  # added tokens parsed: the exception stated above
        self.eos_text = files.eos_token
        self.bos_text = files.bos_token
        self._eot_id = files.token_ids[files.eos_token]
        self._prefix_id = files.token_ids[files.bos_token] if files.bos_token else self._eot_id
        self.stop_ids = files.eos_ids
        self.template_source = files.chat_template

    # ---- tokens ----------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._eot_id

    @property
    def prefix_token_id(self) -> int:
        return self._prefix_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """Ids of ``string`` with special-token strings parsed (see the module docstring); a string that
        starts with the bos string gets no added tokens, as the harness's HF model does."""
        add = add_special_tokens is not False and not (self.bos_text and string.startswith(self.bos_text))
        ids = self.encoder.encode(string, add_special_tokens=add).ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.encoder.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- log-likelihoods -------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives it) per request."""
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        results: list[tuple[float, bool]] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm or not self.progress, desc="loglikelihood")
        for chunk in order.get_batched(n=self.batch_size):
            inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            width = max(len(x) for x in inputs)
            batch = torch.zeros((len(inputs), width), dtype=torch.long, device=self._device)
            for i, x in enumerate(inputs):
                batch[i, :len(x)] = torch.tensor(x, dtype=torch.long)
            with torch.inference_mode():
                logprobs = F.log_softmax(self.net(batch).logits.float(), dim=-1)
            for (request, _, cont), x, row in zip(chunk, inputs, logprobs, strict=True):
                scored = row[len(x) - len(cont):len(x)]
                target = torch.tensor(cont, dtype=torch.long, device=self._device)
                greedy = bool((scored.argmax(-1) == target).all())
                answer = (float(scored.gather(1, target[:, None]).sum()), greedy)
                results.append(answer)
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, answer)
                bar.update(1)
        bar.close()
        return order.get_original(results)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text over the harness's rolling windows (``get_rolling_token_windows``)."""
        windows: list[TokenRequest] = []
        counts: list[int] = []
        for (text,) in (r.args for r in requests):
            rolling = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(text),
                                                         prefix_token=self.prefix_token_id,
                                                         max_seq_len=self.max_length, context_len=1)
            pairs = [lm_utils.make_disjoint_window(w) for w in rolling]
            windows += [(None, ctx, cont) for ctx, cont in pairs]
            counts.append(len(pairs))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals, at = [], 0
        for request, n in zip(requests, counts, strict=True):
            total = sum(s for s, _ in scores[at:at + n])
            at += n
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ---- generation ------------------------------------------------------------------------------------

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Answers to ``(context, gen_kwargs)`` requests, batched by equal kwargs, longest context first."""
        order = Collator([r.args for r in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                         group_by="gen_kwargs", group_fn=lambda r: r[1])
        results: list[str] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm or not self.progress, desc="generate_until")
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk, strict=True)
            answers = self._generate(list(contexts), all_kwargs[0])
            for context, answer in zip(contexts, answers, strict=True):
                results.append(answer)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), answer)
                bar.update(1)
        bar.close()
        return order.get_original(results)

    def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.eos_text)
        budget = int(kwargs.pop("max_gen_toks"))
        if budget >= self.max_length:
            raise ToolError(f"a task asks for max_gen_toks {budget}: must be less than the model's context "
                            f"{self.max_length}")
        sampled = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0.0) > 0
        skip_specials = bool(self.bos_text) and contexts[0].startswith(self.bos_text)  # tok_batch_encode's rule
        prompts = [self.encoder.encode(c, add_special_tokens=not skip_specials).ids[-(self.max_length - budget):]
                   for c in contexts]
        run = Generation(self.net, prompts, max_new_tokens=budget, stop_ids=self.stop_ids,
                         temperature=float(kwargs["temperature"]) if sampled else 0.0,
                         top_k=kwargs.get("top_k") if sampled else None,
                         top_p=kwargs.get("top_p") if sampled else None)
        ended = [False] * len(prompts)
        for step in run:  # stop once every row has met a stop id or a stop string
            for i, token in enumerate(step):
                ended[i] = ended[i] or token is None or any(s and s in self.tok_decode(run.tokens[i]) for s in until)
            if all(ended):
                break
        return [postprocess_generated_text(self.tok_decode(ids), until, None) for ids in run.tokens]

    # ---- chat ------------------------------------------------------------------------------------------

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat rendered by tinylm's template; without a generation prompt the final turn is continued."""
        if add_generation_prompt:
            return render_text(chat_history, add_generation_prompt=True)
        turns = [dict(t) for t in chat_history]
        turns[-1]["content"] = turns[-1]["content"] + _CONTINUE_TAG
        rendered = render_text(turns)
        at = rendered.rindex(_CONTINUE_TAG.strip())
        return rendered[:at] if rendered[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else rendered[:at].rstrip()

    @property
    def tokenizer_name(self) -> str:
        return f"tinylm-{Path(self.loaded.tokenizer.path).parent.name}-{self.loaded.tokenizer.fingerprint[:16]}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.template_source if chat_template else None

    def get_model_info(self) -> dict[str, Any]:
        return {"model_source": "tinylm", "ckpt": str(self.loaded.checkpoint.path),
                "model_num_parameters": sum(p.numel() for p in self.net.parameters())}
