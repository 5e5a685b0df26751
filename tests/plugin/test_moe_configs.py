"""The tuned int8 fused-MoE kernel configs: where they are found, which entry a call gets, bad files."""

from __future__ import annotations

import json

import pytest

from vllm_smoothquant import moe_configs
from vllm_smoothquant.moe_configs import SHIPPED, folders, load_table, pick

H100 = "E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3,dtype=int8_w8a8.json"
KEYS = {"BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages"}


@pytest.fixture(autouse=True)
def _fresh_cache():
    load_table.cache_clear()
    yield
    load_table.cache_clear()


def test_a_call_gets_the_entry_of_the_nearest_tuned_token_count():
    table = {32: "a", 256: "b", 8192: "c"}
    assert [pick(table, m) for m in (1, 32, 100, 200, 256, 4000, 5000, 65536)] == list("aaabbbcc")


MIXTRAL_H100 = "E=8,N=14336,device_name=NVIDIA_H100_80GB_HBM3,dtype=int8_w8a8.json"


@pytest.mark.parametrize("name, tokens", [(H100, [32, 128, 256, 512, 1024, 2048, 4096, 8192]),
                                          (MIXTRAL_H100, [16, 64, 256, 512, 1024, 2048, 4096, 8192])])
def test_the_shipped_h100_tables_are_complete_kernel_configs(name, tokens):
    table = load_table(name, (SHIPPED,))
    assert table and sorted(table) == tokens
    for cfg in table.values():
        assert KEYS <= cfg.keys() and cfg["BLOCK_SIZE_K"] in (64, 128, 256)


def test_the_users_tuned_folder_wins_over_the_shipped_files(tmp_path, monkeypatch):
    entry = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128}
    (tmp_path / H100).write_text(json.dumps({"16": entry}))
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(tmp_path))
    assert folders() == [tmp_path, SHIPPED]
    assert load_table(H100, tuple(folders())) == {16: entry}
    monkeypatch.delenv("VLLM_TUNED_CONFIG_FOLDER")
    assert folders() == [SHIPPED]


def test_the_int32_kernel_reads_its_own_tiles_first_then_vllms_kernels(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(tmp_path))
    assert folders("int32_acc") == [tmp_path / "int32_acc", SHIPPED / "int32_acc", tmp_path, SHIPPED]
    own, vllms = load_table(MIXTRAL_H100, tuple(folders("int32_acc"))), load_table(MIXTRAL_H100, (SHIPPED,))
    assert own != vllms and own[8192]["BLOCK_SIZE_N"] == 256  # the wide tile only it runs fast (RESULTS.md)
    assert load_table(H100, tuple(folders("int32_acc"))) == load_table(H100, (SHIPPED,))  # no own file: vLLM's


def test_no_file_for_the_shape_leaves_the_choice_to_vllm(tmp_path):
    assert load_table("E=60,N=1408,device_name=NVIDIA_H100_80GB_HBM3,dtype=int8_w8a8.json", (tmp_path, SHIPPED)) is None


@pytest.mark.parametrize("content", [{"many": {}}, {"16": 5}, {"16": {"BLOCK_SIZE_M": 16}}])
def test_a_malformed_file_is_an_error_naming_it(tmp_path, content):
    (tmp_path / H100).write_text(json.dumps(content))
    with pytest.raises(ValueError, match=rf"{tmp_path / H100}: not a fused-MoE config file.*fix or remove it"):
        load_table(H100, (tmp_path,))


def test_the_file_name_is_vllms_for_int8_w8a8():
    from vllm.model_executor.layers.fused_moe.fused_moe import get_config_file_name

    name = get_config_file_name(128, 768, moe_configs.DTYPE)
    assert name.startswith("E=128,N=768,device_name=") and name.endswith(",dtype=int8_w8a8.json")
