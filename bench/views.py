"""How long the analyst views take on a sizeable data set: 100k clicks over 1,000
links, 4 subscriptions (about 270k deliveries, 90% delivered with an attempt each,
all within the last day). Medians of 3.
Run as root with the extension installed: /opt/pg_linkhooks-venv/bin/python bench/views.py"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "system"))
from harness import Cluster  # noqa: E402

UA_HUMAN = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
            "Version/17.2 Mobile/15E148 Safari/604.1")
QUERIES = [
    "SELECT * FROM linkhooks.subscription_health",
    "SELECT * FROM linkhooks.link_stats",
    "SELECT * FROM linkhooks.link_stats WHERE link_id = 7",
    "SELECT * FROM linkhooks.link_click_breakdown WHERE link_id = 7",
    "SELECT * FROM linkhooks.campaign_stats",
    "SELECT * FROM linkhooks.delivery_log WHERE event_id = (SELECT event_id FROM linkhooks.deliveries LIMIT 1)",
    "SELECT * FROM linkhooks.worker_status()",
]

cluster = Cluster({"linkhooks.database": "'nobody'"})  # no worker delivering: the data stays as generated
cluster.start()
try:
    with cluster.connect() as db:
        db.execute("CREATE EXTENSION pg_linkhooks")
        for i in range(4):
            db.execute("INSERT INTO linkhooks.subscriptions (name, url) VALUES (%s, 'https://hooks.example.com/x')", [f"s{i}"])
        db.execute("INSERT INTO linkhooks.links (slug, destination, campaign) "
                   "SELECT 'l' || g, 'https://acme.com/', 'c' || (g % 10) FROM generate_series(1, 1000) g")
        db.execute("INSERT INTO linkhooks.clicks (link_id, user_agent, referer, country) "
                   "SELECT 1 + g %% 1000, CASE WHEN g %% 3 = 0 THEN 'Googlebot/2.1' ELSE %s END, "
                   "'https://r' || (g %% 7) || '.example/', 'US' FROM generate_series(1, 100000) g", [UA_HUMAN])
        db.execute("UPDATE linkhooks.deliveries SET status = 'delivered', attempts = 1, "
                   "delivered_at = created_at + interval '5 ms' WHERE id % 10 <> 0")
        db.execute("INSERT INTO linkhooks.delivery_attempts (delivery_id, attempt, started_at, duration_ms, status_code, "
                   "subscription_id) SELECT id, 1, created_at, 5, 200, subscription_id FROM linkhooks.deliveries "
                   "WHERE status = 'delivered'")
        db.execute("VACUUM ANALYZE")
        deliveries = db.execute("SELECT count(*) FROM linkhooks.deliveries").fetchone()[0]
        print(f"100,000 clicks, {deliveries:,} deliveries; median of 3 runs")
        for query in QUERIES:
            times = []
            for _ in range(3):
                start = time.perf_counter()
                db.execute(query).fetchall()
                times.append((time.perf_counter() - start) * 1000)
            print(f"{statistics.median(times):9.1f} ms  {query}")
finally:
    cluster.destroy()
