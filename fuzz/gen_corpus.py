#!/usr/bin/env python3
"""Write the hand-made seed inputs of the fuzz targets (run from anywhere; rewrites them).

Layouts (host byte order, little-endian on the machines this runs on):
  vhost_iotlb_msg  { u64 iova; u64 size; u64 uaddr; u8 perm; u8 type; u8 pad[6]; }   32 bytes
  vhost_msg        { i32 type(=1); u8 hole[4]; union { vhost_iotlb_msg; u8 [64]; } }   72 bytes
  vhost_msg_v2     { u32 type(=2); u32 asid;   union { vhost_iotlb_msg; u8 [64]; } }   72 bytes
  vhost-user       { u32 request; u32 flags; u32 size; } + size payload bytes
vhost_user_decode inputs: one byte b (b % 10 descriptors, attached at stream offset
4 * (b // 10)), then the stream.
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

MISS, UPDATE, INVALIDATE, ACCESS_FAIL = 1, 2, 3, 4
RO, WO, RW = 1, 2, 3


def iotlb(ty, iova=0, size=0, uaddr=0, perm=0):
    return struct.pack("<QQQBB6x", iova, size, uaddr, perm, ty)


def vhost_msg(msg, v2=False, asid=0):
    if v2:
        head = struct.pack("<II", 2, asid)
    else:
        head = struct.pack("<i4x", 1)
    return head + msg.ljust(64, b"\0")


VERSION_1, REPLY, NEED_REPLY = 0x1, 0x4, 0x8


def vu(request, payload=b"", flags=VERSION_1):
    return struct.pack("<III", request, flags, len(payload)) + payload


def vu_input(nfds, *messages):
    return bytes([nfds]) + b"".join(messages)


UPD = iotlb(UPDATE, iova=0x1000, size=0x2000, uaddr=0x7F12_3456_0000, perm=RW)
INV0 = iotlb(INVALIDATE, iova=0, size=0)
INV = iotlb(INVALIDATE, iova=0xFEF0_0000, size=0x10_0000)
MISS_RO = iotlb(MISS, iova=0x1234_5000, perm=RO)
MISS_WO = iotlb(MISS, iova=0xDEAD_B000, perm=WO)

vhost_msg_seeds = {
    "v1_update": vhost_msg(UPD),
    "v2_update": vhost_msg(UPD, v2=True),
    "v1_invalidate_size0": vhost_msg(INV0),
    "v2_invalidate_size0": vhost_msg(INV0, v2=True),
    "v1_invalidate_range": vhost_msg(INV),
    "v1_miss": vhost_msg(MISS_RO),
    "v2_miss": vhost_msg(MISS_WO, v2=True),
    "v2_asid_update": vhost_msg(UPD, v2=True, asid=1),
    "v2_access_fail": vhost_msg(iotlb(ACCESS_FAIL, iova=0x4000, perm=WO), v2=True),
    "v1_min_write_40": vhost_msg(UPD)[:40],
    "iotlb_update": UPD,
    "iotlb_invalidate_size0": INV0,
    "iotlb_miss": MISS_RO,
    "iotlb_batch_begin": iotlb(5),
}

FEATURES = (1 << 32) | (1 << 33) | (1 << 30)  # VERSION_1, ACCESS_PLATFORM, PROTOCOL_FEATURES
vring_addr = struct.pack("<IIQQQQ", 0, 0, 0x10_0000, 0x10_2000, 0x10_1000, 0)
mem_table = struct.pack("<II", 1, 0) + struct.pack(
    "<QQQQ", 0, 0x4000_0000, 0x7F00_0000_0000, 0
)
config = struct.pack("<III", 0, 8, 0) + bytes(8)

vhost_user_seeds = {
    "get_features": vu_input(0, vu(1)),
    "set_features": vu_input(0, vu(2, struct.pack("<Q", FEATURES), VERSION_1 | NEED_REPLY)),
    "set_vring_addr": vu_input(0, vu(9, vring_addr)),
    "iotlb_msg_update": vu_input(0, vu(22, UPD, VERSION_1 | NEED_REPLY)),
    "iotlb_msg_invalidate": vu_input(0, vu(22, INV0, VERSION_1 | NEED_REPLY)),
    "set_mem_table_1_region": vu_input(1, vu(5, mem_table)),
    "set_vring_kick_fd": vu_input(1, vu(12, struct.pack("<Q", 1))),
    "set_vring_call_nofd": vu_input(0, vu(13, struct.pack("<Q", 0x100))),
    "set_backend_req_fd": vu_input(1, vu(21, b"", VERSION_1 | NEED_REPLY)),
    "get_config": vu_input(0, vu(24, config)),
    "get_vring_base": vu_input(0, vu(11, struct.pack("<II", 0, 0))),
    "backend_iotlb_miss": vu_input(0, vu(1, MISS_RO)),
    "reply_u64": vu_input(0, vu(1, struct.pack("<Q", FEATURES), VERSION_1 | REPLY)),
    # fd count 1, attached at stream offset 4 * (51 // 10) = 20: with SET_VRING_KICK's header.
    "fd_with_second_message": vu_input(
        51, vu(2, struct.pack("<Q", FEATURES)), vu(12, struct.pack("<Q", 0))
    ),
    "session": vu_input(
        0,
        vu(1),
        vu(2, struct.pack("<Q", FEATURES)),
        vu(15),
        vu(16, struct.pack("<Q", 0x1 | 0x8 | 0x20)),
        vu(22, UPD, VERSION_1 | NEED_REPLY),
        vu(22, INV0, VERSION_1 | NEED_REPLY),
    ),
}

for target, seeds in (
    ("vhost_msg_decode", vhost_msg_seeds),
    ("vhost_user_decode", vhost_user_seeds),
):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
