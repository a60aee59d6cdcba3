from __future__ import annotations

from vhostuser_rs import BackendRequest, FrontendRequest, ProtocolFeature, VirtioFeature, _native


def test_request_enums_match_the_rust_tables() -> None:
    assert [(m.name, m.value) for m in FrontendRequest] == _native.request_codes(0)
    assert [(m.name, m.value) for m in BackendRequest] == _native.request_codes(1)
    assert len(FrontendRequest) == 45 and len(BackendRequest) == 10


def test_feature_flags_match_the_rust_tables() -> None:
    assert [(m.name, m.value.bit_length() - 1) for m in ProtocolFeature] == _native.feature_bits("protocol")
    assert [(m.name, m.value.bit_length() - 1) for m in VirtioFeature] == _native.feature_bits("virtio")


def test_unknown_bits_are_preserved() -> None:
    value = 0x8F2B | (1 << 40)
    flags = ProtocolFeature(value)
    assert int(flags) == value
    assert ProtocolFeature.REPLY_ACK in flags
    assert int(flags | ProtocolFeature.STATUS) == value | (1 << 16)
    assert int(ProtocolFeature(value) & ProtocolFeature(value)) == value
    offered = VirtioFeature(0x175007E46)
    assert VirtioFeature.VERSION_1 in offered and VirtioFeature.RING_PACKED not in offered
    assert int(offered) == 0x175007E46
