#!/usr/bin/env python3
"""Times the web console's pages over HTTP, from a process of its own (the standard
library only): signs in an officer and a researcher with password and TOTP, then asks each
page RUNS times and prints median, 95th percentile (nearest rank) and slowest, in ms.

Usage: console_timing.py BASE_URL OFFICER OFFICER_TOTP_SECRET RESEARCHER RESEARCHER_TOTP_SECRET
       PASSWORD IDENTIFIER [RUNS]
(IDENTIFIER: a synthetic national identifier of the registry, issuer XT, e.g. SYN000000042.)
Secrets are base32, as in the otpauth URI `admin enrol-totp` prints. Used for
docs/benchmarks.md, "Web console pages".
"""
import base64, hashlib, hmac, re, statistics, struct, sys, time
import urllib.error, urllib.parse, urllib.request

base, officer, o_secret, researcher, r_secret, password, identifier = sys.argv[1:8]
runs = int(sys.argv[8]) if len(sys.argv) > 8 else 20


def totp(secret, at):
    key = base64.b32decode(secret + "=" * (-len(secret) % 8))
    mac = hmac.new(key, struct.pack(">Q", int(at // 30)), hashlib.sha1).digest()
    o = mac[-1] & 15
    return "%06d" % ((struct.unpack(">I", mac[o:o + 4])[0] & 0x7FFFFFFF) % 1000000)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **k):
        return None


class Session:
    """Cookies kept by hand: the console's cookies are `Secure` (`__Host-`), which
    http.cookiejar does not send over http://127.0.0.1 (browsers do: a secure context)."""

    def __init__(self):
        self.cookies = {}
        self.opener = urllib.request.build_opener(NoRedirect())

    def open(self, url, data):
        request = urllib.request.Request(url, data)
        if self.cookies:
            request.add_header("Cookie", "; ".join(f"{k}={v}" for k, v in self.cookies.items()))
        try:
            response = self.opener.open(request)
        except urllib.error.HTTPError as e:
            response = e
        for header in response.headers.get_all("Set-Cookie") or []:
            name, _, rest = header.partition("=")
            value = rest.split(";", 1)[0]
            if "Max-Age=0" in header:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        return response


def session():
    return Session()


def call(web, path, fields=None):
    data = urllib.parse.urlencode(fields).encode() if fields is not None else None
    response = web.open(base + path, data)
    return response.status, response.read().decode()


def csrf(body):
    return re.search(r'name="csrf" value="([0-9a-f]{64})"', body).group(1)


def sign_in(name, secret, step):
    opener = session()
    _, body = call(opener, "/sign-in")
    status, _ = call(opener, "/sign-in", {"csrf": csrf(body), "name": name,
                                          "password": password,
                                          "code": totp(secret, time.time() + 30 * step)})
    assert status == 303, f"sign-in of {name}: {status}"
    return opener


def timed(label, opener, path, fields=None, expect=200):
    times = []
    for _ in range(runs + 1):  # one warm-up
        t = time.perf_counter()
        status, body = call(opener, path, fields)
        times.append((time.perf_counter() - t) * 1000)
        assert status == expect, f"{label}: {status} {body[:300]}"
    times = sorted(times[1:])
    p95 = times[max(0, -(-95 * len(times) // 100) - 1)]
    print(f"| {label} | {statistics.median(times):.1f} | {p95:.1f} | {times[-1]:.1f} |", flush=True)
    return body


officer_web = sign_in(officer, o_secret, 0)
researcher_web = sign_in(researcher, r_secret, 0)
_, home = call(officer_web, "/home")
o_csrf = csrf(home)
_, home = call(researcher_web, "/home")
r_csrf = csrf(home)

print(f"| page | median ms | p95 ms | slowest ms |")
print("|---|---:|---:|---:|")
page = timed("officer: find a patient by national identifier (derivation) + consent history",
             officer_web, "/officer/patient",
             {"csrf": o_csrf, "kind": "national", "registry": "ERN-LUNG",
              "national.issuing_country": "XT", "national.value": identifier})
pseudonym = re.search(r'name="pseudonym" value="([^"]+)"', page).group(1)
timed("officer: open a patient by pseudonym + consent history", officer_web,
      "/officer/patient", {"csrf": o_csrf, "kind": "pseudonym", "registry": "ERN-LUNG",
                           "pseudonym": pseudonym})
for days in (30, 365):
    page = timed(f"officer: expiry lists, first pages (next {days} days; last 90 days)",
                 officer_web, f"/officer/expiring?days={days}")
rows = page.count('action="/officer/patient"')
m = re.search(r'<form method="post" action="/officer/expiring">(.*?)</form>', page, re.S)
if m:
    fields = dict(re.findall(r'name="([^"]+)" value="([^"]*)"', m.group(1)))
    timed("officer: expiry list, next page (next 365 days)", officer_web,
          "/officer/expiring", fields)
print(f"\n(first expiry page of 365 days: {rows} rows shown)", file=sys.stderr)
for label, fields in [
    ("researcher: count table, diagnosis x sex",
     {"group_by[0]": "DIAGNOSIS", "group_by[1]": "SEX"}),
    ("researcher: count table, country x sex, filter diagnosis",
     {"group_by[0]": "COUNTRY", "group_by[1]": "SEX",
      "filters[0].dimension": "DIAGNOSIS", "filters[0].values": "ORPHA:586, ORPHA:558"}),
    ("researcher: count table, diagnosis, filter ORPHA:558 with its subtypes (names beside codes)",
     {"group_by[0]": "DIAGNOSIS", "filters[0].dimension": "DIAGNOSIS",
      "filters[0].values": "ORPHA:558", "filters[0].include_descendants": "on"}),
    # These two need an HPO release in force (the largest set of terms below one term,
    # and a common one); see docs/benchmarks.md.
    ("researcher: count table, sex, filter HP:0000118 and every term below it",
     {"group_by[0]": "SEX", "filters[0].dimension": "PHENOTYPE",
      "filters[0].values": "HP:0000118", "filters[0].include_descendants": "on"}),
    ("researcher: count table, diagnosis, filter HP:0001250 (seizure) and terms below",
     {"group_by[0]": "DIAGNOSIS", "filters[0].dimension": "PHENOTYPE",
      "filters[0].values": "HP:0001250", "filters[0].include_descendants": "on"}),
]:
    timed(label, researcher_web, "/research/count",
          dict(fields, csrf=r_csrf, registry="ERN-LUNG"))
timed("researcher: diagnostic delay plot, by onset age band", researcher_web,
      "/research/delay", {"csrf": r_csrf, "registry": "ERN-LUNG",
                          "group_by[0]": "ONSET_AGE_BAND"})
timed("researcher: where is the expertise, ORPHA:558", researcher_web, "/expertise",
      {"csrf": r_csrf, "orphacodes": "ORPHA:558"})
