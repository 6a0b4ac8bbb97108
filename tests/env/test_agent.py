"""Action parsing, the episode state as data, and prompt building with a token budget."""
import dataclasses

import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from ace.env.actions import INFO_TOPICS, Action, FormatError, format_action, parse_action
from ace.env.agent import AgentState, StepRecord
from ace.env.prompt import PromptConfig, build_messages, render_prompt
from ace.env.task import Competition

# Code without backtick fences or action tags, as a tiny model would write.
code_text = st.text(st.characters(blacklist_characters="`<>\r", blacklist_categories=("Cs",)),
                    min_size=1, max_size=200).filter(lambda s: s.strip())


@settings(max_examples=150, deadline=None)
@given(kind=st.sampled_from(["validate_code", "execute_code"]), code=code_text,
       prefix=st.text(st.characters(blacklist_characters="<`"), max_size=50))
def test_parse_inverts_format_for_code_actions(kind, code, prefix):
    action = Action(kind, code.strip("\n") + "\n")
    assert parse_action(prefix + format_action(action)) == action


@pytest.mark.parametrize("topic", INFO_TOPICS)
def test_parse_inverts_format_for_info_and_submit(topic):
    assert parse_action(format_action(Action("request_info", topic))) == Action("request_info", topic)
    assert parse_action("I am done.\n<submit/>") == Action("submit")
    assert parse_action("<submit></submit>") == Action("submit")


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(max_size=300), st.text(st.sampled_from(list("<>/`_execodlsubmitpyn\n ")),
                                                     max_size=120)))
def test_parse_never_raises(text):
    out = parse_action(text)
    assert isinstance(out, (Action, FormatError))


def test_parse_is_lenient_about_what_surrounds_the_action():
    text = ("<think>maybe <submit/> now?</think>Let me train a model.\n<execute_code>\n"
            "```python\nprint(1)\n```\n</execute_code>\nThat should work.")
    assert parse_action(text) == Action("execute_code", "print(1)\n")
    assert parse_action("<validate_code>print(2)</validate_code>") == Action("validate_code", "print(2)\n")
    assert parse_action("<request_info> Data </request_info>") == Action("request_info", "data")


@pytest.mark.parametrize("text, needle", [
    ("just chatting", "no action found"),
    ("<execute_code>```python\nprint(1)\n```", "unclosed <execute_code>"),
    ("<execute_code>  \n</execute_code>", "holds no code"),
    ("<request_info>weather</request_info>", "'weather'"),
    ("<validate_code/>", "needs a body"),
])
def test_malformed_output_becomes_format_error_naming_the_problem(text, needle):
    out = parse_action(text)
    assert isinstance(out, FormatError) and needle in out.message


def _state_with_history(n, *, comp_id="toy", durations=1.0, max_steps=10):
    recs = tuple(StepRecord("execute_code", f"print({i})\n", stdout_tail=f"out-{i}",
                            stderr_tail=f"err-{i}", valid=True, score=0.5 + i, duration_s=durations,
                            returncode=0, milestones=("imports",)) for i in range(n))
    best = 0.5 + n - 1 if n else None
    return AgentState(comp_id=comp_id, max_steps=max_steps, step=n, history=recs, best_score=best,
                      best_code=f"print({n - 1})\n" if n else None, best_step=n - 1 if n else None,
                      time_used_s=durations * n, time_limit_s=100.0)


def test_state_json_round_trip_is_exact():
    s = _state_with_history(3)
    assert AgentState.from_json(s.to_json()) == s
    assert AgentState.from_json(AgentState.initial("x", max_steps=2).to_json()) == AgentState("x", 2)


def test_state_key_ignores_durations_but_not_content():
    a, b = _state_with_history(3, durations=1.0), _state_with_history(3, durations=7.0)
    assert a.state_key() == b.state_key()
    assert a.state_key() == AgentState.from_json(a.to_json()).state_key()
    changed = dataclasses.replace(a, history=a.history[:2] + (dataclasses.replace(a.history[2], content="x=1"),))
    assert changed.state_key() != a.state_key()
    assert _state_with_history(2).state_key() != a.state_key()


def test_state_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="max_steps must be >= 1, got 0"):
        AgentState("x", max_steps=0)
    with pytest.raises(ValueError, match="history has 0 records but step is 2"):
        AgentState("x", max_steps=4, step=2)
    with pytest.raises(ValueError, match="version"):
        AgentState.from_json('{"comp_id": "x"}')


def test_state_done_on_steps_time_or_submit():
    s = AgentState("x", max_steps=3)
    assert not s.done
    assert dataclasses.replace(s, submitted=True).done
    assert dataclasses.replace(s, time_limit_s=5.0, time_used_s=5.0).done
    assert _state_with_history(3, max_steps=3).done


@pytest.fixture
def comp(tmp_path):
    pub, priv = tmp_path / "public", tmp_path / "private"
    pub.mkdir(), priv.mkdir()
    pd.DataFrame({"id": range(8), "feat_a": range(8), "target": [0, 1] * 4}).to_csv(pub / "train.csv", index=False)
    pd.DataFrame({"id": range(8, 12), "feat_a": range(4)}).to_csv(pub / "test.csv", index=False)
    pd.DataFrame({"id": range(8, 12), "target": 0}).to_csv(pub / "sample_submission.csv", index=False)
    return Competition(comp_id="toy", description="# Toy\nPredict the target. " + "words " * 200,
                       public_dir=pub, private_dir=priv, metric="accuracy", higher_is_better=True,
                       id_column="id", target_columns=("target",), leaderboard=(0.5, 0.6, 0.7),
                       task_type="binary")


def test_prompt_holds_task_data_history_and_status(comp):
    msgs = build_messages(_state_with_history(2), comp, PromptConfig())
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert "<execute_code>" in msgs[0]["content"] and "./submission/submission.csv" in msgs[0]["content"]
    user = msgs[1]["content"]
    for needle in ("Predict the target", "train.csv: 8 rows, 3 columns: id, feat_a, target",
                   "test.csv: 4 rows", "print(1)", "out-1", "err-0", "score 1.5",
                   "Best valid score so far: 1.5", "Steps left: 8 of 10", "Time left: 98s", "accuracy"):
        assert needle in user, needle


def _chars_over_4(msgs):
    return sum(len(m["content"]) for m in msgs) // 4


def test_prompt_trimming_drops_oldest_history_first_and_keeps_the_most_that_fits(comp):
    state = _state_with_history(9)
    full = _chars_over_4(build_messages(state, comp, PromptConfig()))
    budget = full - 60
    msgs = build_messages(state, comp, PromptConfig(), count_tokens=_chars_over_4, max_prompt_tokens=budget)
    user = msgs[1]["content"]
    assert _chars_over_4(msgs) <= budget
    kept = [i for i in range(9) if f"out-{i}\n" in user or user.endswith(f"out-{i}")]
    assert kept and kept == list(range(9 - len(kept), 9)), kept  # a suffix: the newest records
    assert f"[{9 - len(kept)} earlier step(s) omitted]" in user
    # Brute force over a sweep of budgets: every result fits, and none keeps fewer records than
    # a result that another budget produced and that would also have fitted.
    results = []
    for b in range(budget - 400, full + 1, 20):
        m = build_messages(state, comp, PromptConfig(), count_tokens=_chars_over_4, max_prompt_tokens=b)
        n_kept = sum(f"out-{i}" in m[1]["content"] for i in range(9))
        assert _chars_over_4(m) <= b
        results.append((b, n_kept, _chars_over_4(m)))
    for b, n_kept, _ in results:
        assert all(n_kept >= k for _, k, t in results if t <= b)
    assert results[-1][1] == 9


def test_prompt_shortens_description_when_history_is_not_enough(comp):
    state = _state_with_history(1)
    no_history = _chars_over_4(build_messages(AgentState("toy", max_steps=10), comp, PromptConfig()))
    msgs = build_messages(state, comp, PromptConfig(), count_tokens=_chars_over_4,
                          max_prompt_tokens=no_history - 100)
    assert _chars_over_4(msgs) <= no_history - 100 and "out-0" not in msgs[1]["content"]
    with pytest.raises(ValueError, match="max_prompt_tokens=10"):
        build_messages(state, comp, PromptConfig(), count_tokens=_chars_over_4, max_prompt_tokens=10)
    with pytest.raises(ValueError, match="needs count_tokens"):
        build_messages(state, comp, PromptConfig(), max_prompt_tokens=10)
    with pytest.raises(ValueError, match="'other'"):
        build_messages(AgentState("other", max_steps=2), comp, PromptConfig())


def _hf_tokenizer(chat_template):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set("<s> system user assistant hello world rules answer : | \n".split(" ")))
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", chat_template=chat_template)


def test_render_prompt_uses_the_tokenizers_chat_template():
    import jinja2

    template = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                "{% if add_generation_prompt %}<s> assistant : {% endif %}")
    tok = _hf_tokenizer(template)
    msgs = [{"role": "system", "content": "rules"}, {"role": "user", "content": "hello world"}]
    text = jinja2.Template(template).render(messages=msgs, add_generation_prompt=True)
    assert render_prompt(tok, msgs) == tok.encode(text, add_special_tokens=False)
    assert tok.decode(render_prompt(tok, msgs)).split()[-2:] == ["assistant", ":"]


def test_render_prompt_falls_back_to_a_plain_layout_without_template():
    class Chars:
        def encode(self, text):
            return [ord(c) for c in text]

    msgs = [{"role": "user", "content": "hi"}]
    assert "".join(map(chr, render_prompt(Chars(), msgs))) == "<|user|>\nhi\n<|assistant|>\n"
    with pytest.raises(ValueError, match="'role'"):
        render_prompt(Chars(), [{"content": "x"}])
