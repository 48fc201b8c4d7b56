//! The monitoring files under `deploy/`: the Prometheus scrape config, the
//! alert rules and their unit tests (checked with `promtool`, from the Debian
//! package `prometheus`, which `scripts/test.sh` installs) and the Grafana
//! dashboard (checked against the metric names the daemon exposes).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Every metric the daemon exposes at `GET /metrics` (SPEC.md, "Metrics"),
/// and whether it is a histogram (exposed as `_bucket`, `_sum`, `_count`).
/// Checked against `src/metrics.rs` by
/// `metrics_list_matches_the_names_the_daemon_defines`.
const METRICS: &[(&str, bool)] = &[
    ("switchyard_connections_total", false),
    ("switchyard_active_connections", false),
    ("switchyard_bytes_total", false),
    ("switchyard_backend_up", false),
    ("switchyard_backend_connect_errors_total", false),
    ("switchyard_health_checks_total", false),
    ("switchyard_health_check_duration_seconds", true),
    ("switchyard_rejected_connections_total", false),
    ("switchyard_connection_duration_seconds", true),
    ("switchyard_http_requests_total", false),
    ("switchyard_config_reloads_total", false),
    (
        "switchyard_config_last_reload_success_timestamp_seconds",
        false,
    ),
    ("switchyard_accept_paused_total", false),
    ("switchyard_dns_lookups_total", false),
    ("switchyard_udp_datagrams_total", false),
    ("switchyard_upgrades_total", false),
    ("switchyard_tls_handshakes_total", false),
    ("switchyard_tls_certificate_expiry_timestamp_seconds", false),
];

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file)
}

fn read(file: &str) -> String {
    let path = deploy(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs `promtool <args> <file>` from the crate root and fails the test,
/// with promtool's output, unless it exits 0. Returns stdout and stderr.
fn promtool(args: &[&str], file: &str) -> String {
    let path = deploy(file);
    let out = match Command::new("promtool")
        .args(args)
        .arg(&path)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "promtool not found on PATH: these tests need it to check deploy/prometheus/. \
             Run the tests with `bash scripts/test.sh`, which installs it \
             (Debian package `prometheus`: apt-get install -y prometheus)"
        ),
        Err(e) => panic!("could not run promtool: {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "`promtool {} {}` failed ({}):\n{text}",
        args.join(" "),
        path.display(),
        out.status
    );
    text
}

#[test]
fn alert_rules_are_valid() {
    let out = promtool(&["check", "rules"], "prometheus/alerts.yml");
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn alert_rules_pass_their_unit_tests() {
    let out = promtool(&["test", "rules"], "prometheus/alerts.test.yml");
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn scrape_config_is_valid_and_loads_the_alerts() {
    // Run from the crate root: `alerts.yml` must resolve from the config's
    // own directory, as Prometheus resolves it.
    let out = promtool(&["check", "config"], "prometheus/prometheus.yml");
    assert!(out.contains("alerts.yml"), "alerts.yml not checked:\n{out}");
}

/// The metrics `src/metrics.rs` defines: every string constant of its
/// `names` module, and whether it is registered with `histogram(...)`.
fn defined_metrics() -> BTreeMap<String, bool> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/metrics.rs");
    let source =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let start = source
        .find("pub mod names {")
        .expect("src/metrics.rs has no `pub mod names {`");
    let body = &source[start..];
    let body = &body[..body.find("\n}").expect("`mod names` does not end")];
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut consts = BTreeMap::new();
    for item in body.split("pub const ").skip(1) {
        let (name, rest) = item.split_once(':').expect("`pub const NAME: &str = ...`");
        let value = rest
            .split('"')
            .nth(1)
            .unwrap_or_else(|| panic!("names::{name} is not a string literal"));
        assert!(
            value.starts_with("switchyard_"),
            "names::{name} = {value:?} lacks the switchyard_ prefix"
        );
        consts.insert(name.trim(), value);
    }
    assert!(consts.len() >= 10, "only {} names found", consts.len());
    // `histogram(NAME, ...)` in `Metrics::new`: any other text that happens
    // to read `histogram(` is not followed by a name of the module.
    let histograms: HashSet<&str> = source
        .match_indices("histogram(")
        .filter_map(|(at, call)| {
            let rest = source[at + call.len()..].trim_start();
            consts.get(&rest[..rest.find(|c| !ident(c)).unwrap_or(rest.len())])
        })
        .copied()
        .collect();
    assert!(!histograms.is_empty(), "no histogram(NAME, ...) found");
    consts
        .values()
        .map(|&name| (name.to_owned(), histograms.contains(name)))
        .collect()
}

#[test]
fn metrics_list_matches_the_names_the_daemon_defines() {
    let defined = defined_metrics();
    let mut listed = BTreeMap::new();
    for &(metric, histogram) in METRICS {
        assert!(
            listed.insert(metric.to_owned(), histogram).is_none(),
            "{metric} is listed twice in METRICS"
        );
    }
    let mut errors = Vec::new();
    for (metric, histogram) in &defined {
        match listed.get(metric) {
            None => errors.push(format!(
                "{metric} is defined in src/metrics.rs but missing from METRICS \
                 (add it, and a dashboard panel for it)"
            )),
            Some(listed) if listed != histogram => errors.push(format!(
                "{metric}: METRICS says histogram = {listed}, src/metrics.rs registers \
                 histogram = {histogram}"
            )),
            Some(_) => {}
        }
    }
    for metric in listed.keys().filter(|m| !defined.contains_key(*m)) {
        errors.push(format!(
            "{metric} is in METRICS but src/metrics.rs (`names`) does not define it"
        ));
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

/// The metric a name in a query refers to: itself, or for a histogram's
/// `_bucket`/`_sum`/`_count` series the histogram. Unknown names, and a
/// histogram's bare name (no such series exists), are errors.
fn metric_of(name: &str) -> Result<&'static str, String> {
    for &(metric, histogram) in METRICS {
        if name == metric {
            return if histogram {
                Err(format!(
                    "{name} is a histogram: query {name}_bucket, _sum or _count"
                ))
            } else {
                Ok(metric)
            };
        }
        if histogram
            && ["_bucket", "_sum", "_count"]
                .iter()
                .any(|suffix| name.strip_suffix(suffix) == Some(metric))
        {
            return Ok(metric);
        }
    }
    Err(format!("{name} is not a metric switchyard exposes"))
}

/// The `switchyard_*` names in a text (a PromQL expression, a rules file),
/// each mapped by [`metric_of`].
fn metrics_in(text: &str) -> Vec<Result<&'static str, String>> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut found = Vec::new();
    for (at, _) in text.match_indices("switchyard_") {
        if text[..at].chars().next_back().is_some_and(ident) {
            continue; // inside a longer identifier
        }
        let rest = &text[at..];
        let end = rest.find(|c: char| !ident(c)).unwrap_or(rest.len());
        found.push(metric_of(&rest[..end]));
    }
    found
}

#[test]
fn the_metric_name_check_catches_mistakes() {
    let ok = |expr: &str| metrics_in(expr).into_iter().collect::<Result<Vec<_>, _>>();
    assert_eq!(
        ok(
            r#"histogram_quantile(0.99, sum by (le) (rate(switchyard_connection_duration_seconds_bucket[5m])))"#
        ),
        Ok(vec!["switchyard_connection_duration_seconds"])
    );
    assert_eq!(
        ok(r#"up{job="switchyard"} + switchyard_backend_up"#),
        Ok(vec!["switchyard_backend_up"])
    );
    assert!(ok("rate(switchyard_conections_total[5m])").is_err());
    assert!(ok("switchyard_connections_total_bucket").is_err());
    assert!(ok("switchyard_health_check_duration_seconds").is_err());
    assert!(ok("switchyard_backend_up2").is_err());
}

/// Every object in `value` (at any depth) with a `panels` array yields its
/// panels; rows nest theirs.
fn panels(value: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    let mut todo = vec![value];
    while let Some(v) = todo.pop() {
        if let Some(list) = v.get("panels").and_then(Value::as_array) {
            for panel in list {
                all.push(panel);
                todo.push(panel);
            }
        }
    }
    all
}

/// Every string under an `expr` key, at any depth (panel targets,
/// annotation queries).
fn exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(list) => list.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[test]
fn dashboard_is_valid_and_covers_every_metric() {
    let text = read("grafana/switchyard.json");
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard is not valid JSON");

    assert!(
        dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion: {}",
        dashboard["schemaVersion"]
    );
    let variables: HashSet<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for name in ["datasource", "instance", "listener"] {
        assert!(variables.contains(name), "no template variable {name}");
    }

    let panels = panels(&dashboard);
    assert!(panels.len() >= 11, "only {} panels", panels.len());
    let mut cells = HashMap::new();
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        let pos = &panel["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| {
            pos[k]
                .as_u64()
                .unwrap_or_else(|| panic!("panel {title:?}: gridPos.{k} missing"))
        });
        assert!(
            x + w <= 24 && w > 0 && h > 0,
            "panel {title:?}: gridPos {pos}"
        );
        for cell in (x..x + w).flat_map(|x| (y..y + h).map(move |y| (x, y))) {
            if let Some(other) = cells.insert(cell, title) {
                panic!("panels {other:?} and {title:?} overlap at {cell:?}");
            }
        }
    }
    let mut ids = HashSet::new();
    let mut used = BTreeSet::new();
    let mut errors = Vec::new();
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        let id = panel["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("panel {title:?} has no numeric id"));
        assert!(ids.insert(id), "panel id {id} is used twice ({title:?})");
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {title:?} must use the datasource variable"
        );
        let mut queries = Vec::new();
        exprs(&panel["targets"], &mut queries);
        assert!(
            queries.iter().any(|q| !q.trim().is_empty()),
            "panel {title:?} has no query"
        );
        for query in queries {
            for metric in metrics_in(&query) {
                match metric {
                    Ok(metric) => {
                        used.insert(metric);
                    }
                    Err(e) => errors.push(format!("panel {title:?}: {e}")),
                }
            }
        }
    }
    // Queries outside panels (annotations, variables) must be right too.
    let mut others = Vec::new();
    exprs(&dashboard["annotations"], &mut others);
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        others.extend(var["definition"].as_str().map(String::from));
    }
    for query in others {
        for metric in metrics_in(&query) {
            if let Err(e) = metric {
                errors.push(format!("annotation or variable {query:?}: {e}"));
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));

    let missing: Vec<&str> = METRICS
        .iter()
        .map(|&(metric, _)| metric)
        .filter(|metric| !used.contains(metric))
        .collect();
    assert!(missing.is_empty(), "no panel shows {missing:?}");
}

#[test]
fn alert_files_name_only_exposed_metrics() {
    for file in ["prometheus/alerts.yml", "prometheus/alerts.test.yml"] {
        let errors: Vec<String> = metrics_in(&read(file))
            .into_iter()
            .filter_map(Result::err)
            .collect();
        assert!(errors.is_empty(), "{file}:\n{}", errors.join("\n"));
    }
}
