#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/seeds/<target>/: small valid (and a few edge-case)
inputs for each fuzz target. Re-run after changing it; the output is committed."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def put(target, name, data):
    d = os.path.join(HERE, "seeds", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def msg(tag, body=b""):
    return tag + struct.pack(">i", len(body) + 4) + body


def cstr(s):
    return s.encode() + b"\0"


# startup_packet: bodies after the length word.
def startup(params):
    return struct.pack(">i", 196608) + b"".join(cstr(k) + cstr(v) for k, v in params) + b"\0"


put("startup_packet", "psql", startup([("user", "postgres"), ("database", "postgres"),
                                       ("application_name", "psql"), ("client_encoding", "UTF8")]))
put("startup_packet", "minimal", startup([("user", "u")]))
put("startup_packet", "ssl", struct.pack(">i", 80877103))
put("startup_packet", "gss", struct.pack(">i", 80877104))
put("startup_packet", "cancel", struct.pack(">iii", 80877102, 1234, -99))
put("startup_packet", "v2", struct.pack(">i", 131072) + b"x\0")

# frame_scanner: byte 0 = mode (odd: build frames from triples), byte 1 = number of cuts,
# then the cut positions, then the stream.
rfq = msg(b"Z", b"I")
row = msg(b"T", b"\0\x01?column?\0" + b"\0" * 6 + b"\0\x17\0\x04\xff\xff\xff\xff\0\0")
data = msg(b"D", b"\0\x01\0\0\0\x011")
done = msg(b"C", cstr("SELECT 1"))
err = msg(b"E", b"SERROR\0VERROR\0C42601\0Msyntax error\0\0")
put("frame_scanner", "select1_backend", b"\0\x03\x10\x80\xf0" + row + data + done + rfq)
put("frame_scanner", "query_frontend", b"\0\x01\x07" + msg(b"Q", cstr("SELECT 1")) + msg(b"X"))
ext = (msg(b"P", b"\0" + cstr("SELECT $1") + b"\0\0") + msg(b"B", b"\0\0\0\0\0\x01\0\0\0\x011\0\0")
       + msg(b"D", b"P\0") + msg(b"E", b"\0\0\0\0\0") + msg(b"S"))
put("frame_scanner", "extended_frontend", b"\0\x04\x01\x40\x80\xfe" + ext)
put("frame_scanner", "error_backend", b"\0\x02\x02\x03" + err + rfq)
copy = msg(b"G", b"\0\0\0") + msg(b"d", b"1\t2\n" * 8) + msg(b"c") + done + rfq
put("frame_scanner", "copy_in", b"\0\x02\x30\xa0" + copy)
put("frame_scanner", "triples", b"\x01\x02\x10\x90" + b"Z\x01I" + b"D\x05hello" + b"E\x00")

# error_fields: ErrorResponse bodies.
put("error_fields", "server_error", b"SERROR\0VERROR\0C57014\0Mcanceling statement due to user request\0Fpostgres.c\0L3300\0\0")
put("error_fields", "proxy_fatal", b"SFATAL\0C53300\0Mpgsluice: too many clients\0Hretry later\0\0")
put("error_fields", "notice", b"SNOTICE\0VNOTICE\0C00000\0Mhello\0\0")
put("error_fields", "unterminated", b"SERROR\0C08006")

# scram_exchange: ctl byte (bit0 md5, bits1-2 user, bit3 raw), then first |~| final.
put("scram_exchange", "alice_good_proof", b"\x00n,,n=,r=fuzzclientnonce|~|c=biws,r=%N,p=%P")
put("scram_exchange", "alice_bad_proof", b"\x00n,,n=alice,r=abc|~|c=biws,r=%N,p=" + b"A" * 43 + b"=")
put("scram_exchange", "nobody_good_form", b"\x06n,,n=,r=xyz|~|c=biws,r=%N,p=%P")
put("scram_exchange", "y_flag", b"\x00y,,n=,r=q|~|c=eSws,r=%N,p=%P")
put("scram_exchange", "bad_cbind", b"\x00n,,n=,r=q|~|c=eSws,r=%N,p=%P")
md5_resp = msg(b"p", cstr("md5" + "0" * 32))
put("scram_exchange", "bob_md5_raw", b"\x0d" + md5_resp)
put("scram_exchange", "raw_wrong_tag", b"\x08" + msg(b"Q", cstr("SELECT 1")))

# users_file
put("users_file", "mixed", "# comment\nalice:secret\nbob:md5" + "0123456789abcdef" * 2 + "\n"
    "carol:SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg==$"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n")
put("users_file", "quoted", '"user with space" "pass word"\n\n  # indented comment\r\n')
put("users_file", "duplicate", "a:x\na:y\n")

# config_toml
put("config_toml", "full", 'listen = "127.0.0.1:6432"\nupstream = "postgres://app:pw@127.0.0.1:5432/app"\n'
    'pool_mode = "transaction"\npool-size = 20\nmax-active = 8\nmax-queue = 100\n'
    'queue-timeout = "5s"\nquery_timeout = "30s"\nshare = ["batch=1", "web=4"]\n'
    'admin-listen = "off"\nlog-format = "json"\n')
put("config_toml", "auth", 'auth = "scram-sha-256"\nusers = "/etc/pgsluice/users.txt"\n'
    'listen = "0.0.0.0:6432"\n')
put("config_toml", "bad", 'pool-size = 0\nunknown-key = 1\n')
