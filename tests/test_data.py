import json

import pytest
import torch
from transformers import AutoTokenizer

from phases.data import curriculum, dataset_files, hub_download, hub_registry
from phases.data import tokenizer as bpe


@pytest.fixture(scope="module")
def splits():
    return curriculum.generate(train_per_stage=200, eval_per_stage=30, seed=11)


def test_curriculum_is_deterministic_by_seed(splits):
    again = curriculum.generate(train_per_stage=200, eval_per_stage=30, seed=11)
    other = curriculum.generate(train_per_stage=200, eval_per_stage=30, seed=12)
    assert again == splits
    assert [r["text"] for r in other["train"]] != [r["text"] for r in splits["train"]]


def test_curriculum_shape(splits):
    assert {k: len(v) for k, v in splits.items()} == {"train": 600, "validation": 90, "test": 90}
    for split in splits.values():
        assert {r["stage"] for r in split} == set(curriculum.STAGES)
    tasks = {r["task"] for r in splits["train"]}
    assert tasks == {"text", "arithmetic", "word_problem", "kv_recall"}
    train = {r["text"] for r in splits["train"]}
    assert not train & {r["text"] for s in ("validation", "test") for r in splits[s]}


def test_every_answer_checks_out(splits):
    rows = [r for s in splits.values() for r in s]
    assert all(curriculum.verify(r) for r in rows)
    # the checker is independent: a wrong label is caught
    wp = next(r for r in rows if r["task"] == "word_problem" and r["stage"] == "advanced")
    assert not curriculum.verify({**wp, "answer": str(int(wp["answer"]) + 1)})
    kv = next(r for r in rows if r["task"] == "kv_recall" and "changed to" in r["prompt"])
    key = json.loads(kv["program"])["key"]
    stale = next(
        (v for k, v in [(x.split(" is ")[0].removeprefix("The code for "), x.split(" is ")[1].rstrip("."))
                        for x in kv["prompt"].split(". ") if x.startswith("The code for ")] if k == key), None)
    if stale and stale != kv["answer"]:
        assert not curriculum.verify({**kv, "answer": stale})
    ar = next(r for r in rows if r["task"] == "arithmetic")
    assert not curriculum.verify({**ar, "answer": "-999999"})


def test_every_skill_is_named_and_held_out_skills_are_balanced(splits):
    assert {r["task"] for r in splits["train"]} == set(curriculum.SKILLS)
    for stage, mix in curriculum.MIX.items():
        counts = [sum(r["task"] == t and r["stage"] == stage for r in splits["test"]) for t in mix]
        assert max(counts) - min(counts) <= 1, (stage, counts)


def test_recall_codes_lie_beyond_the_attention_window(splits, tmp_path):
    tok = bpe.train_bpe((r["text"] for r in splits["train"]), vocab_size=600)
    recall = [r for r in splits["test"] if r["task"] == "kv_recall"]
    assert recall
    for r in recall:
        key = json.loads(r["program"])["key"]
        passage, question = r["prompt"].split("\nQuestion:")
        last = passage.rfind(f"code for {key} ")
        gap = tok.encode(passage[last:].split(".", 1)[1] + "\nQuestion:" + question, add_special_tokens=False)
        assert len(gap) > 64 and curriculum.pretokens(passage[last:]) > curriculum.RECALL_GAP
    # the checker reads the gap from the passage: a code stated just before the question is refused
    r = recall[0]
    passage, question = r["prompt"].split("\nQuestion:")
    key = json.loads(r["program"])["key"]
    near = f"{passage} The code for {key} is {r['answer']}.\nQuestion:{question}"
    assert not curriculum.verify({**r, "prompt": near, "text": f"{near} {r['answer']}"})


def test_word_problems_work_each_step_in_columns_and_every_step_is_checked(splits):
    wp = next(r for r in splits["train"] if r["task"] == "word_problem" and r["stage"] == "advanced")
    assert wp["text"] == f"{wp['prompt']} {wp['rationale']} {curriculum.ANSWER_MARK} {wp['answer']}"
    assert curriculum.verify(wp)
    # the arithmetic skill's own working, one step per sentence of the story, the longer operand first
    assert curriculum.worked_step(7, 58, "+") == ("58+7=8+7+0=5c1,5+0+1=6c0", 65)
    assert curriculum.story_steps_add_up("2*4=8. 32+8=2+8+0=0c1,3+0+1=4c0. 40-2=0-2-0=8c1,4-0-1=3c0.", "38")
    # a wrong column, a wrong product, a step that does not start from the count before it: wrong labels
    assert not curriculum.story_steps_add_up("2*4=8. 32+8=2+8+0=0c1,3+0+0=3c0. 30-2=0-2-0=8c1,3-0-1=2c0.", "28")
    assert not curriculum.story_steps_add_up("2*4=9. 32+9=2+9+0=1c1,3+0+1=4c0.", "41")
    assert not curriculum.story_steps_add_up("32+8=2+8+0=0c1,3+0+1=4c0. 50-2=0-2-0=8c1,5-0-1=4c0.", "48")
    step = wp["rationale"].split(". ")[-1]
    slipped = wp["rationale"].replace(step, step.replace("c0", "c1", 1) if "c0" in step else step.replace("c1", "c0", 1))
    assert not curriculum.verify({**wp, "rationale": slipped,
                                  "text": f"{wp['prompt']} {slipped} {curriculum.ANSWER_MARK} {wp['answer']}"})
    # the checker reads the answer after the working, not a column's digit
    assert curriculum.check_answer(wp, f" {wp['rationale']} {curriculum.ANSWER_MARK} {wp['answer']}")
    assert not curriculum.check_answer(wp, f" {wp['rationale']}")


def test_word_problems_grow_harder_by_stage(splits):
    def mean_steps(stage):
        rows = [r for r in splits["train"] if r["task"] == "word_problem" and r["stage"] == stage]
        return sum(len(json.loads(r["program"])["steps"]) for r in rows) / len(rows)

    assert mean_steps("advanced") > mean_steps("reasoning")


def test_check_answer_normalizes():
    ex = {"answer": "42"}
    assert curriculum.check_answer(ex, " 42.") and curriculum.check_answer(ex, "The answer is 42.0")
    assert not curriculum.check_answer(ex, "43")


def test_safe_eval_refuses_code():
    assert curriculum.safe_eval("(3 + 4) * 2 - 1") == 13
    with pytest.raises(ValueError):
        curriculum.safe_eval("__import__('os').system('true')")


def test_splits_round_trip_through_datasets(splits, tmp_path):
    dataset_files.save_splits(splits, tmp_path / "d")
    dd = dataset_files.load_splits(tmp_path / "d")
    assert dd["train"].num_rows == 600 and dd["test"][0] == splits["test"][0]


def test_tokenizer_round_trips_and_loads_with_transformers(splits, tmp_path):
    tok = bpe.train_bpe((r["text"] for r in splits["train"]), vocab_size=600)
    bpe.save(tok, tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    texts = [r["text"] for r in splits["validation"]] + ["unseen: ünïcödé ✓ 日本 \t\n  spaces"]
    assert bpe.roundtrip_rate(loaded, texts) == 1.0
    assert loaded.eos_token == bpe.EOS and loaded.pad_token == bpe.PAD
    assert len(loaded) <= 600 and bpe.chars_per_token(loaded, texts) > 2.0
    # digits are single tokens, so every number is spelled the same way digit by digit
    pieces = [loaded.decode([i]) for i in loaded.encode("What is 123 + 4567?", add_special_tokens=False)]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("1234567")


# One row per registry entry, in that dataset's own schema (as documented on the Hub).
SAMPLES = {
    "gsm8k": {"question": "Tom has 3 cats and gets 2 more. How many?", "answer": "3+2=<<3+2=5>>5\n#### 5"},
    "svamp": {"Body": "There are 7 eggs.", "Question": "If 2 break, how many are left?", "Answer": 5.0,
              "Equation": "( 7.0 - 2.0 )"},
    "asdiv": {"question": "What is 4 plus 4?", "result": "8", "result_float": 8.0},
    "mbpp": {"text": "Write a function add(a, b).", "code": "def add(a, b):\n    return a + b",
             "test_list": ["assert add(1, 2) == 3"]},
    "arc_easy": {"question": "Which is a liquid?", "choices": {"text": ["ice", "water"], "label": ["A", "B"]},
                 "answerKey": "B"},
    "arc_challenge": {"question": "Pick 2.", "choices": {"text": ["one", "two"], "label": ["1", "2"]},
                      "answerKey": "2"},
    "hotpot_qa": {"question": "Who?", "answer": "Ada",
                  "context": {"title": ["T1"], "sentences": [["Ada wrote it.", " Yes."]]}},
    "drop": {"passage": "The score was 10.", "question": "What was the score?",
             "answers_spans": {"spans": ["10"], "types": ["number"]}},
    "strategy_qa": {"question": "Is water wet?", "answer": True, "facts": ["Water is a liquid."]},
    "piqa": {"goal": "Open a jar", "sol1": "Twist the lid", "sol2": "Eat the lid", "label": 0},
    "hellaswag": {"ctx": "A man opens a door.", "endings": ["a", "b", "c", "d"], "label": "2"},
    "boolq": {"question": "is the sky blue", "answer": True, "passage": "The sky is blue."},
    "wikitext": {"text": " The river flows through the old valley and reaches the sea after many miles . \n"},
    "wikitext2": {"text": " The river flows through the old valley and reaches the sea after many miles . \n"},
    "fineweb_edu": {"text": "Photosynthesis converts light energy into chemical energy in plants and algae."},
    "openwebtext": {"text": "A long enough paragraph of web text that passes the minimum length filter."},
}
EXPECTED = {"gsm8k": "5", "svamp": "5", "asdiv": "8", "arc_easy": "B", "arc_challenge": "B", "hotpot_qa": "Ada",
            "drop": "10", "strategy_qa": "yes", "piqa": "A", "hellaswag": "C", "boolq": "yes"}


def test_registry_has_the_sixteen_planned_datasets():
    assert len(hub_registry.REGISTRY) == 16
    ids = {d.hub_id for d in hub_registry.REGISTRY.values()}
    for expected in ["openai/gsm8k", "ChilleD/SVAMP", "MU-NLPC/Calc-asdiv_a", "google-research-datasets/mbpp",
                     "allenai/ai2_arc", "hotpotqa/hotpot_qa", "ucinlp/drop", "wics/strategy-qa", "ybisk/piqa",
                     "Rowan/hellaswag", "google/boolq", "Salesforce/wikitext", "HuggingFaceFW/fineweb-edu"]:
        assert expected in ids
    assert {d.stage for d in hub_registry.REGISTRY.values()} <= set(curriculum.STAGES)


def test_every_registry_dataset_is_pinned_to_a_commit_but_the_one_branch_named():
    unpinned = {d.name: d.revision for d in hub_registry.REGISTRY.values() if not hub_registry.is_commit(d.revision)}
    assert unpinned == {"strategy_qa": "refs/convert/parquet"}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_converters_map_onto_the_curriculum_schema(name):
    ds = hub_registry.lookup(name)
    row = ds.to_schema(SAMPLES[name], 0)
    assert row is not None and set(row) == set(curriculum.FIELDS)
    assert row["source"] == f"hub:{ds.hub_id}" and row["stage"] == ds.stage and row["text"]
    if name in EXPECTED:
        assert row["answer"] == EXPECTED[name] and row["text"].endswith(row["answer"])


def test_unlabelled_rows_are_dropped():
    assert hub_registry.lookup("hellaswag").to_schema({**SAMPLES["hellaswag"], "label": ""}, 0) is None
    assert hub_registry.lookup("wikitext").to_schema({"text": " = Heading = \n"}, 0) is None


def test_unknown_dataset_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown hub dataset 'gsm9k'.*gsm8k"):
        hub_registry.lookup("gsm9k")


def test_offline_download_fails_naming_the_dataset(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub_download.DatasetUnavailable, match=r"'gsm8k' \(openai/gsm8k.*could not be read: \w+"):
        hub_download.fetch(hub_registry.lookup("gsm8k"), 10, 10)


def test_arithmetic_is_worked_column_by_column_and_every_column_is_checked(splits):
    ar = next(r for r in splits["train"] if r["task"] == "arithmetic" and r["stage"] == "advanced")
    assert ar["text"] == f"{ar['prompt']}{ar['rationale']}. {curriculum.ANSWER_MARK} {ar['answer']}"
    assert curriculum.column_steps(58, 67, "+") == ["8+7+0=5c1", "5+6+1=2c1"]  # 125: the last carry leads
    assert curriculum.column_steps(402, 57, "-") == ["2-7-0=5c1", "0-5-1=4c1", "4-0-1=3c0"]  # 345
    assert curriculum.verify(ar)
    # one wrong column is a wrong label, even when the final answer is right
    steps = ar["rationale"].split(",")
    x = steps[0]
    bad = f"{x[:-3]}{(int(x[-3]) + 1) % 10}{x[-2:]}"
    wrong = ",".join([bad, *steps[1:]])
    assert not curriculum.verify({**ar, "rationale": wrong,
                                  "text": f"{ar['prompt']}{wrong}. {curriculum.ANSWER_MARK} {ar['answer']}"})
    # the column checker is a second solver, not column_steps again: a dropped carry whose steps are each
    # internally consistent is caught, as is an operand digit read wrong
    assert not curriculum.columns_add_up("58+67=", "8+7+0=5c1,5+6+0=1c1", "115")
    assert not curriculum.columns_add_up("58+67=", "8+7+0=5c1,4+6+1=1c1", "115")
    assert not curriculum.columns_add_up("57-402=", "7-2-0=5c0,5-0-0=5c0", "-345")
    assert curriculum.columns_add_up("99+1=", "9+1+0=0c1,9+0+1=0c1", "100")
    # the checker reads the answer after the working, not a column's digit
    assert curriculum.check_answer(ar, f"{ar['rationale']}. {curriculum.ANSWER_MARK} {ar['answer']}")
    assert not curriculum.check_answer(ar, ar["rationale"])


def test_packed_rows_keep_examples_whole_and_put_the_loss_on_what_a_model_writes(splits):
    from phases.cognate.data import Batches, pack_whole

    tok = bpe.train_bpe((r["text"] for r in splits["train"]), vocab_size=600)
    examples = [r for r in splits["train"] if r["task"] in ("arithmetic", "text")][:40]
    ids, labels = pack_whole(examples, tok, 64)
    assert ids.shape == labels.shape and ids.shape[1] == 64
    assert bool((labels[ids == tok.pad_token_id] == -100).all())
    # every example's text is in some row, whole; an arithmetic prompt carries no loss, its working does
    flat, lab = ids.flatten().tolist(), labels.flatten().tolist()
    for ex in examples:
        text = tok.encode(ex["text"], add_special_tokens=False) + [tok.eos_token_id]
        at = next(i for i in range(len(flat) - len(text) + 1) if flat[i:i + len(text)] == text)
        assert at // 64 == (at + len(text) - 1) // 64, "an example was cut at a row boundary"
        n_prompt = len(tok.encode(ex["prompt"], add_special_tokens=False)) if ex["answer"] else 0
        assert lab[at:at + n_prompt] == [-100] * n_prompt
        assert lab[at + n_prompt:at + len(text)] == text[n_prompt:]
    x, y = Batches(ids, 4, seed=3, labels=labels)(7)
    assert torch.equal(y[x == tok.pad_token_id], torch.full_like(y[x == tok.pad_token_id], -100))


def test_the_answers_gate_fails_a_curriculum_with_one_wrong_label(splits):
    from phases.data.gates import prepare_gates

    rows = [r for s in splits.values() for r in s]
    ar = next(i for i, r in enumerate(rows) if r["task"] == "arithmetic")
    rows[ar] = {**rows[ar], "answer": str(int(rows[ar]["answer"]) + 10)}
    measured = {"verified_fraction": sum(curriculum.verify(r) for r in rows) / len(rows), "train_heldout_overlap": 0,
                "rows": {"train": 1}}
    tok = {"roundtrip_rate": 1.0, "chars_per_token": 3.0}
    gates = {g.id: g for g in prepare_gates(measured, tok, 0, 0, {}).gates}
    assert measured["verified_fraction"] < 1 and not gates["answers_verified"].passed
    assert "no_heldout_leak" not in gates  # 0 by construction: reported, not gated
