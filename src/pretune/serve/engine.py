"""The generation engine behind `pretune serve` and `pretune chat`: continuous batching on one model.

One background thread owns the model. Requests are queued as jobs; between decode steps the engine
admits waiting jobs into the running batch, and every decode step runs ONE forward pass for all
active sequences. Rows finish independently (EOS, a stop string, max_tokens, or cancellation) and
leave the batch at once, so a short request never waits for a long one.

How sequences of different lengths share one KV cache: each row keeps its own length. A row's
tokens lie at slots [0, length) of its row of the cache and each is rotated by RoPE at its own
position (GPT.forward's `positions`), so a row is stored exactly as `eval.generate.stream_tokens`
stores its sequence, whatever the other rows hold:

- waiting jobs join at the next step whenever a row is free, whatever their prompt's length and
  their max_tokens (submit checks that prompt + max_tokens fit the context): no job waits for
  another one's position, and no batch has to drain first;
- joining jobs are prefilled together on their new rows, each prompt at slots [0, n) (prompts of
  very different lengths in separate forwards, so that short ones are not padded to a long one);
  the padding after a short prompt is never seen (a row's mask hides the slots past its position)
  and its later tokens overwrite it in order;
- a decode step feeds every row its last token at slot `length` of its row and reads the slots up
  to the longest row's, each row masked to its own;
- rows are kept contiguous (0..n-1): a finished row is replaced by the last one (its slots
  [0, length) are copied), so a decode step computes exactly the active rows.

Greedy outputs equal those of `eval.generate.stream_tokens` (tests/test_serve.py and
tests/test_serve_fixes.py check it for prompts of different lengths joining at different steps and
rows moved when others finish), and a seeded sampled output does too,
since each row samples with its own generator exactly as `stream_tokens` does.

Text is produced in the engine: each job decodes its tokens incrementally, holds back text that
could be the start of a stop string or an incomplete UTF-8 character, and stops at the first stop
string (the stop string itself is not returned, as in OpenAI's API).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from pretune.data.templates import stop_ids
from pretune.eval.generate import PREFIX_TOKENS, TextStream, filter_logits
from pretune.model.gpt import GPT, KVCache

log = logging.getLogger("pretune.serve")


@dataclass
class SamplingParams:
    """How one job samples; temperature 0 is greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Event:
    """What a job reports: new text, tokens generated so far, and at the end a finish reason
    ('stop', 'length', 'cancelled' or 'error', with a message)."""

    text: str
    tokens: int
    finish_reason: str | None = None
    error: str | None = None


_ids = itertools.count(1)


class Job:
    """One generation request; `sink` receives its Events (called from the engine thread)."""

    def __init__(self, prompt: list[int], params: SamplingParams, sink: Callable[[Event], None], tokenizer):
        self.id = next(_ids)
        self.prompt = list(prompt)
        self.params = params
        self.sink = sink
        self.stream = TextStream(tokenizer, params.stop, prefix=self.prompt[-PREFIX_TOKENS:])
        self.n_tokens = 0
        self.finish_reason: str | None = None
        self.cancelled = threading.Event()
        self.created = time.time()


@dataclass
class _Row:
    """An active sequence: its job, the tokens in its cache (prompt and outputs fed back), the next
    token to feed."""

    job: Job
    length: int
    gen: torch.Generator | None
    last: int = 0
    done: bool = False


class Engine:
    """Continuous batching over one model; see the module docstring for the design."""

    def __init__(self, model: GPT, tokenizer, max_batch: int = 16, ctx: int | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        p = next(model.parameters())
        # the cache holds ctx positions per row: the model's context, or less when the caller knows
        self.device, self.ctx = p.device, min(ctx or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.cache = KVCache.empty(model.cfg, max_batch, self.ctx, p.device, p.dtype)
        self.rows: list[_Row] = []
        self.waiting: deque[Job] = deque()
        self.stop_ids = stop_ids(tokenizer)  # EOS, and a chat template's end-of-turn token
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self.throttle_s = 0.0  # a pause after each step; tests use it to make generation slow
        self.stats = {"steps": 0, "rows_stepped": 0, "prefills": 0, "max_active": 0, "completed": 0,
                      "cancelled": 0, "errors": 0, "tokens": 0}
        self.history: deque[Job] = deque(maxlen=256)  # recently finished jobs, newest last
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False

    # ------------------------------------------------------------------ public, any thread

    def start(self) -> "Engine":
        """Start the thread that owns the model."""
        if self._thread is None:
            self._closing = False
            self._thread = threading.Thread(target=self._loop, name="pretune-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread; jobs still queued or running end as 'cancelled'."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        for job in list(self.waiting) + [r.job for r in self.rows]:
            self._finish(job, "cancelled")
        self.waiting.clear()
        self.rows.clear()

    def submit(self, prompt: list[int], params: SamplingParams, sink: Callable[[Event], None]) -> Job:
        """Queue a job. The prompt and max_tokens must fit the context: len + max_tokens <= max_seq_len."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if params.max_tokens < 1 or len(prompt) + params.max_tokens > self.ctx:
            raise ValueError(f"{len(prompt)} prompt tokens + max_tokens={params.max_tokens} exceed the "
                             f"model's context of {self.ctx} tokens")
        job = Job(prompt, params, sink, self.tokenizer)
        with self._cv:
            self.waiting.append(job)
            self._cv.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Stop a job at the next step (its sink then gets finish_reason 'cancelled')."""
        if job.finish_reason is None:
            job.cancelled.set()
            with self._cv:
                self._cv.notify_all()

    def generate(self, prompt: list[int], params: SamplingParams) -> Iterator[Event]:
        """Submit a job and yield its events in this thread; leaving the loop early cancels the job."""
        q: queue.Queue[Event] = queue.Queue()
        job = self.submit(prompt, params, q.put)
        try:
            while True:
                ev = q.get()
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            self.cancel(job)

    @property
    def active(self) -> int:
        """Jobs running or waiting."""
        return len(self.rows) + len(self.waiting)

    # ------------------------------------------------------------------ the engine thread

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closing and not self.waiting and not self.rows:
                    self._cv.wait()
                if self._closing:
                    return
            try:
                self.step()
            except Exception as e:  # a bug or out of memory: fail the running jobs, keep serving
                log.exception("generation step failed")
                self._fail_all(f"{type(e).__name__}: {e}")
            if self.throttle_s and self.rows:
                time.sleep(self.throttle_s)

    @torch.inference_mode()
    def step(self) -> None:
        """Drop cancelled rows, admit waiting jobs (prefill), then one decode step for all rows.
        Called by the engine thread; tests call it directly on an engine that was never started."""
        for r in self.rows:
            if r.job.cancelled.is_set():
                r.done = True
                self._finish(r.job, "cancelled")
        self._retire()
        self._admit()
        if self.rows:
            self._decode()

    def _admit(self) -> None:
        """Move waiting jobs into the free rows, oldest first, and prefill them."""
        with self._cv:
            dropped = [job for job in self.waiting if job.cancelled.is_set()]  # even when the batch is full
            group = [job for job in self.waiting if not job.cancelled.is_set()][:self.max_batch - len(self.rows)]
            if group or dropped:
                taken = {id(j) for j in group + dropped}
                self.waiting = deque(j for j in self.waiting if id(j) not in taken)
        for job in dropped:
            self._finish(job, "cancelled")
        try:
            for part in prefill_groups(group):
                self._prefill(part)
        except Exception as e:  # the jobs left the queue: tell their clients
            for job in group:
                self._finish(job, "error", error=f"{type(e).__name__}: {e}")
            raise

    def _prefill(self, group: list[Job]) -> None:
        """Prefill `group` on rows n..n+k-1, each prompt at slots [0, len) of its row."""
        n, k = len(self.rows), len(group)
        width = max(len(j.prompt) for j in group)
        idx = torch.full((k, width), self.pad_id, dtype=torch.long)
        for i, job in enumerate(group):
            idx[i, :len(job.prompt)] = torch.tensor(job.prompt)
        view = KVCache(self.cache.k[:, n:n + k], self.cache.v[:, n:n + k])  # slot 0 on; writes go to the cache
        last = torch.tensor([i * width + len(j.prompt) - 1 for i, j in enumerate(group)])  # logits there only
        logits = self.model(idx.to(self.device), cache=view, select=last.to(self.device))
        self.stats["prefills"] += 1
        new = []
        for job in group:
            gen = None
            if job.params.temperature > 0:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(job.params.seed if job.params.seed is not None else torch.seed())
            new.append(_Row(job, len(job.prompt), gen))
        self.rows.extend(new)
        self._sample(new, logits)
        self._retire()

    def _decode(self) -> None:
        """One forward for every active row, each at its own next slot."""
        n = len(self.rows)
        idx = torch.tensor([[r.last] for r in self.rows], device=self.device)
        positions = torch.tensor([[r.length] for r in self.rows], device=self.device)
        self.cache.pos = max(r.length for r in self.rows) + 1  # the slots read
        logits = self.model(idx, cache=self.cache, positions=positions)[:, -1]
        for r in self.rows:
            r.length += 1
        self.stats["steps"] += 1
        self.stats["rows_stepped"] += n
        self.stats["max_active"] = max(self.stats["max_active"], n)
        self._sample(self.rows, logits)
        self._retire()

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Next token of each row: argmax for greedy rows; for sampled rows, probabilities computed
        once per group of rows with the same settings, then one draw from each row's own generator."""
        tokens = logits.argmax(-1).tolist()
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            if r.gen is not None:
                p = r.job.params
                groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
        for (temperature, top_k, top_p), members in groups.items():
            probs = filter_logits(logits[members], temperature, top_k, top_p)
            for j, i in enumerate(members):
                tokens[i] = int(torch.multinomial(probs[j:j + 1], 1, generator=rows[i].gen)[0, 0])
        for r, token in zip(rows, tokens):
            self._accept(r, token)

    def _accept(self, row: _Row, token: int) -> None:
        job = row.job
        if job.cancelled.is_set():
            row.done = True
            self._finish(job, "cancelled")
            return
        if token in self.stop_ids:
            row.done = True
            self._finish(job, "stop", job.stream.flush())
            return
        job.n_tokens += 1
        self.stats["tokens"] += 1
        row.last = token
        text, stopped = job.stream.push(token)
        if stopped:
            row.done = True
            self._finish(job, "stop", text)
        elif job.n_tokens >= job.params.max_tokens:
            row.done = True
            self._finish(job, "length", text + job.stream.flush())
        elif text:
            self._emit(job, Event(text, job.n_tokens))

    def _retire(self) -> None:
        """Remove finished rows, moving the last row into each hole so rows stay 0..n-1."""
        i = 0
        while i < len(self.rows):
            if not self.rows[i].done:
                i += 1
                continue
            last = len(self.rows) - 1
            if i != last:
                moved = self.rows[last]
                s = slice(0, moved.length)
                self.cache.k[:, i, :, s] = self.cache.k[:, last, :, s]
                self.cache.v[:, i, :, s] = self.cache.v[:, last, :, s]
                self.rows[i] = moved
            self.rows.pop()

    def _finish(self, job: Job, reason: str, text: str = "", error: str | None = None) -> None:
        if job.finish_reason is not None:
            return
        job.finish_reason = reason
        key = {"cancelled": "cancelled", "error": "errors"}.get(reason, "completed")
        self.stats[key] += 1
        self.history.append(job)
        self._emit(job, Event(text, job.n_tokens, reason, error))

    def _fail_all(self, message: str) -> None:
        for r in self.rows:
            self._finish(r.job, "error", error=message)
        self.rows.clear()

    @staticmethod
    def _emit(job: Job, event: Event) -> None:
        try:
            job.sink(event)
        except Exception:  # the receiver is gone (its event loop closed): nothing to tell
            log.debug("job %s: event dropped", job.id)


def prefill_groups(jobs: list[Job]) -> list[list[Job]]:
    """The jobs prefilled in one forward each: prompts of similar lengths, since every prompt of a
    forward is padded to its longest; a group takes the next longer prompt while the padded
    positions stay within twice the real ones."""
    groups: list[list[Job]] = []
    real = 0
    for job in sorted(jobs, key=lambda j: len(j.prompt)):
        n = len(job.prompt)
        if groups and n * (len(groups[-1]) + 1) <= 2 * (real + n):
            groups[-1].append(job)
            real += n
        else:
            groups.append([job])
            real = n
    return groups


@torch.inference_mode()
def generate_all(model: GPT, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                 max_batch: int = 32) -> list[list[int]]:
    """Greedy continuations of many prompts, batched through the engine in this thread: the tokens
    `eval.generate.generate(model, prompt, max_new_tokens, temperature=0, stop_ids={EOS}, slide=False)`
    gives for each prompt, without the cost of decoding one sequence at a time. A prompt too long
    for the context keeps its last tokens, as many as leave room for max_new_tokens (at least half
    the context), and max_new_tokens shrinks to fit what is left."""
    if max_new_tokens < 1 or not prompts:
        return [[] for _ in prompts]
    ctx = model.cfg.max_seq_len
    keep = max(ctx - max_new_tokens, ctx // 2, 1)
    prompts = [prompt[-keep:] if len(prompt) > keep else prompt for prompt in prompts]
    # a cache as long as the longest prompt and its answer, not the model's whole context
    need = min(ctx, max(len(p) for p in prompts) + max_new_tokens)
    engine = Engine(model, tokenizer, max_batch=max(1, min(max_batch, len(prompts))), ctx=need)
    jobs = []
    for prompt in prompts:
        params = SamplingParams(max_tokens=min(max_new_tokens, ctx - len(prompt)), temperature=0)
        jobs.append(engine.submit(prompt, params, lambda event: None))
    while engine.active:
        engine.step()
    return [job.stream.ids[:job.n_tokens] for job in jobs]
