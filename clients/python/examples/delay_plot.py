"""Diagnostic delay by age at onset in the demo registry, as a table and a plot.

    ERN_API_KEY=ern_... python delay_plot.py [SERVER]     # default 127.0.0.1:50051
"""

import sys

import matplotlib

matplotlib.use("Agg")  # no display needed

from ern_registry import Client, plot_diagnostic_delay

server = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
with Client(server) as client:  # the API key comes from ERN_API_KEY
    df = client.diagnostic_delay("ERN-LUNG", group_by=["onset_age_band"])

print(df.round(1).to_string())
print(
    f"k={df.ern.k}, {df.ern.suppressed} cells suppressed "
    f"({int(df.ern.mask.sum().sum())} missing above), consent as of {df.ern.as_of:%Y-%m-%d %H:%M} UTC"
)
ax = plot_diagnostic_delay(df, title="ERN-LUNG: diagnostic delay by age at onset")
ax.figure.savefig("delay.png", dpi=150, bbox_inches="tight")
print("wrote delay.png")
