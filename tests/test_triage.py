"""Triage classifies by content, using trimmed copies of real captures."""

import pytest

from sentinel import RequestClass, classify
from conftest import capture

CAPTURES = ["session-title-and-turns", "tool-roundtrip-and-context", "bash-permission-and-compact",
            "print-mode"]


def messages_requests(name):
    return [r for r in capture(name) if r["path"].startswith("/v1/messages?")]


@pytest.mark.parametrize("name", CAPTURES)
def test_captured_traffic_splits_into_titles_and_real_turns(name):
    classes = [classify(r["body"]) for r in messages_requests(name)]
    titles = [r for r in messages_requests(name) if not r["body"]["tools"]]
    assert classes.count(RequestClass.TITLE) == len(titles)
    assert classes.count(RequestClass.REAL) == len(classes) - len(titles)


def test_title_sent_under_the_main_model_name_is_still_a_title():
    body = messages_requests("session-title-and-turns")[0]["body"]
    assert body["model"] == "local-model"
    assert classify(body) is RequestClass.TITLE


def test_compact_summary_request_is_real_work():
    compact = messages_requests("bash-permission-and-compact")[-1]["body"]
    assert "CRITICAL: Respond with TEXT ONLY" in compact["messages"][-1]["content"][-1]["text"]
    assert classify(compact) is RequestClass.REAL


def test_older_is_new_topic_title_form():
    body = {
        "model": "claude-haiku-4-5-20251001", "max_tokens": 512,
        "system": [{"type": "text", "text": "Analyze if this message indicates a new conversation "
                    "topic. If it does, extract a 2-3 word title that captures the new topic. Format "
                    "your response as a JSON object with two fields: 'isNewTopic' (boolean) and "
                    "'title' (string, or null if isNewTopic is false)."}],
        "messages": [{"role": "user", "content": "fix the flaky login test"}],
    }
    assert classify(body) is RequestClass.TITLE


def test_haiku_named_background_call():
    body = {"model": "claude-3-5-haiku-20241022", "max_tokens": 300,
            "messages": [{"role": "user", "content": "Summarize this tool use in 5 words"}]}
    assert classify(body) is RequestClass.HAIKU


def test_haiku_named_subagent_with_tools_is_real():
    body = {"model": "claude-haiku-4-5", "max_tokens": 8000, "tools": [{"name": "Read"}],
            "messages": [{"role": "user", "content": "Explore the repo"}]}
    assert classify(body) is RequestClass.REAL


def test_haiku_named_web_fetch_prompt_needs_the_model():
    body = {"model": "claude-haiku-4-5", "max_tokens": 1024,
            "messages": [{"role": "user", "content": "Web page content:\n---\n<html>...</html>\n---\n"
                          "What does the page say about pricing?"}]}
    assert classify(body) is RequestClass.REAL


def test_bash_prefix_detection():
    body = {"model": "claude-haiku-4-5", "max_tokens": 512,
            "system": "Your task is to process Bash commands that an AI coding agent wants to run.",
            "messages": [{"role": "user", "content": "<policy_spec>\n# Claude Code Code Bash command "
                          "prefix detection\n...</policy_spec>\n\nCommand: git status"}]}
    assert classify(body) is RequestClass.BASH_PREFIX


def test_quota_probe():
    body = {"model": "claude-sonnet-4-5", "max_tokens": 1,
            "messages": [{"role": "user", "content": "quota"}]}
    assert classify(body) is RequestClass.QUOTA


@pytest.mark.parametrize("body", [
    {"messages": []},
    {"messages": [{"role": "user", "content": None}], "system": 7, "output_config": "x"},
    {"messages": ["not a dict"], "model": None, "tools": None},
])
def test_odd_shapes_never_raise(body):
    assert classify(body) is RequestClass.REAL
