//! The report folder: the charts and an `index.html` that shows them with the chosen configuration,
//! the budget and the prediction's measured error as text. Plain HTML and CSS (no JavaScript), the
//! charts linked as files beside it, so the folder opens from disk and can be copied anywhere.
//! Rendering is pure ([`render_report`]); [`write_report_dir`] is the one place that writes.

use super::charts::{
    Chart, Skipped, accuracy_summary, configs_from_candidates, configs_from_probes, render_charts,
};
use super::data::{ConfigRef, ReportData};
use crate::commands::human_bytes;
use crate::probe::COMPONENT_NAMES;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Every file of a report, rendered and not yet written.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderedReport {
    pub charts: Vec<Chart>,
    pub skipped: Vec<Skipped>,
    pub index_html: String,
}

impl RenderedReport {
    /// (file name, contents) of every file, `index.html` last.
    pub fn files(&self) -> Vec<(&str, &str)> {
        let mut files: Vec<(&str, &str)> = self
            .charts
            .iter()
            .map(|c| (c.file.as_str(), c.svg.as_str()))
            .collect();
        files.push(("index.html", self.index_html.as_str()));
        files
    }
}

/// Renders every chart and the page. The same data always gives the same bytes.
pub fn render_report(data: &ReportData) -> Result<RenderedReport> {
    let (charts, skipped) = render_charts(data)?;
    let index_html = index_html(data, &charts, &skipped);
    Ok(RenderedReport {
        charts,
        skipped,
        index_html,
    })
}

/// Renders the report and writes it into `out` (created if missing), each file atomically (a
/// temporary file renamed into place). Returns the paths written, `index.html` last.
pub fn write_report_dir(data: &ReportData, out: &Path) -> Result<Vec<PathBuf>> {
    write_rendered(&render_report(data)?, out)
}

/// Writes an already rendered report into `out`, as [`write_report_dir`] does.
pub fn write_rendered(report: &RenderedReport, out: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create the report folder `{}`", out.display()))?;
    let mut written = Vec::new();
    for (name, contents) in report.files() {
        let path = out.join(name);
        crate::cost::calibrate::write_atomic(&path, contents.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// Escapes text for HTML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#222;\
max-width:1160px;margin:24px auto;padding:0 16px;line-height:1.45}\
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:32px 0 8px}\
.sub{color:#666;margin:0 0 18px}\
.summary{display:grid;grid-template-columns:max-content 1fr;gap:6px 18px;background:#f6f6f6;\
border:1px solid #e2e2e2;border-radius:6px;padding:14px 18px}\
.summary dt{font-weight:600}.summary dd{margin:0}\
figure{margin:18px 0 28px}figure img{max-width:100%;height:auto;border:1px solid #e6e6e6}\
figcaption{color:#555;font-size:14px;margin-top:6px}\
table{border-collapse:collapse;font-size:14px}td,th{border-bottom:1px solid #e4e4e4;padding:4px 10px;text-align:right}\
td:first-child,th:first-child{text-align:left}\
.swatch{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:6px;vertical-align:-1px}\
.item{white-space:nowrap;margin-right:14px}ul{padding-left:22px}footer{color:#888;font-size:13px;margin-top:40px}";

/// The chosen configuration in words, with what was predicted or measured for it, its components,
/// and, for a predicted pick that a probe also measured, that measurement against the prediction.
fn chosen_text(data: &ReportData) -> (String, Option<[u64; 6]>, Option<String>) {
    let candidates = configs_from_candidates(&data.candidates);
    let probes = configs_from_probes(&data.profile);
    let Some(chosen) = &data.chosen else {
        let why = if data.candidates.is_empty() {
            "none (no candidates.csv or tuned.toml among the inputs)"
        } else {
            "none: no evaluated configuration fits the budget"
        };
        return (why.to_string(), None, None);
    };
    let Some(view) = candidates
        .iter()
        .chain(probes.iter())
        .find(|v| v.id == *chosen)
    else {
        return ("(not among the inputs)".to_string(), None, None);
    };
    let (what, measured) = match chosen {
        ConfigRef::Candidate { .. } => {
            let measured = probes.iter().find(|p| p.same_knobs(view)).map(|p| {
                let error = if p.peak_bytes > 0 {
                    100.0 * (view.peak_bytes as f64 - p.peak_bytes as f64) / p.peak_bytes as f64
                } else {
                    0.0
                };
                format!(
                    "peak {}, {:.0} tokens/s (probe at {} layer(s)); the prediction is {:+.1}% off{}",
                    human_bytes(p.peak_bytes),
                    p.tokens_per_s,
                    p.layers.unwrap_or(0),
                    error,
                    match data.budget_bytes {
                        Some(b) if p.peak_bytes > b => ", and the measured peak exceeds the budget",
                        Some(_) => ", within the budget",
                        None => "",
                    }
                )
            });
            (
                format!(
                    "predicted peak {}, {} with the safety margin, {:.0} tokens/s",
                    human_bytes(view.peak_bytes),
                    human_bytes(view.required_bytes),
                    view.tokens_per_s
                ),
                measured,
            )
        }
        ConfigRef::Probe { .. } => (
            format!(
                "measured peak {}, {:.0} tokens/s",
                human_bytes(view.peak_bytes),
                view.tokens_per_s
            ),
            None,
        ),
    };
    (
        format!("{} — {what}", view.label),
        Some(view.components),
        measured,
    )
}

fn error_text(data: &ReportData) -> String {
    match accuracy_summary(data) {
        Some((median, worst, label)) => format!(
            "median |predicted − measured| / measured {:.1}%, worst {:.1}% ({}), over {} configuration(s) not used in fitting",
            100.0 * median,
            100.0 * worst,
            label,
            data.accuracy.len()
        ),
        None => "not measured (no accuracy.csv among the inputs)".to_string(),
    }
}

fn index_html(data: &ReportData, charts: &[Chart], skipped: &[Skipped]) -> String {
    let mut h = String::new();
    let model = data.model.as_deref().unwrap_or("(model not named)");
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    h.push_str(&format!(
        "<title>memtune report: {}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        escape(model)
    ));
    h.push_str(&format!(
        "<h1>memtune report: {}</h1>\n<p class=\"sub\">memtune {} · {} chart(s)</p>\n",
        escape(model),
        env!("CARGO_PKG_VERSION"),
        charts.len()
    ));

    let (chosen, components, measured) = chosen_text(data);
    let budget = match data.budget_bytes {
        Some(b) => match data.margin {
            Some(m) => format!(
                "{} with a {:.0}% safety margin on the predicted peak",
                human_bytes(b),
                100.0 * m
            ),
            None => human_bytes(b),
        },
        None => "not given".to_string(),
    };
    h.push_str("<dl class=\"summary\">\n");
    h.push_str(&format!(
        "<dt>Chosen configuration</dt><dd id=\"chosen\">{}</dd>\n",
        escape(&chosen)
    ));
    if let Some(parts) = components {
        let list: Vec<String> = COMPONENT_NAMES
            .iter()
            .zip(parts)
            .zip(super::charts::COMPONENT_COLOURS)
            .map(|((name, bytes), c)| {
                format!(
                    "<span class=\"item\"><span class=\"swatch\" style=\"background:#{:02x}{:02x}{:02x}\"></span>{} {}</span>",
                    c.0,
                    c.1,
                    c.2,
                    name,
                    escape(&human_bytes(bytes))
                )
            })
            .collect();
        h.push_str(&format!(
            "<dt>Its components</dt><dd>{}</dd>\n",
            list.join(" ")
        ));
    }
    if let Some(m) = measured {
        h.push_str(&format!(
            "<dt>Measured for it</dt><dd id=\"measured\">{}</dd>\n",
            escape(&m)
        ));
    }
    h.push_str(&format!(
        "<dt>Budget</dt><dd id=\"budget\">{}</dd>\n",
        escape(&budget)
    ));
    h.push_str(&format!(
        "<dt>Prediction error</dt><dd id=\"error\">{}</dd>\n",
        escape(&error_text(data))
    ));
    h.push_str("</dl>\n");

    for chart in charts {
        h.push_str(&format!(
            "<h2>{}</h2>\n<figure>\n<img src=\"{}\" alt=\"{}\">\n<figcaption>{}</figcaption>\n</figure>\n",
            escape(&chart.title),
            escape(&chart.file),
            escape(&chart.title),
            escape(&chart.caption)
        ));
    }

    if !data.accuracy.is_empty() {
        h.push_str("<h2>Predicted vs measured, by configuration</h2>\n<table>\n<tr><th>configuration</th><th>predicted peak</th><th>measured peak</th><th>error</th></tr>\n");
        for r in &data.accuracy {
            h.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:+.1}%</td></tr>\n",
                escape(&r.label),
                escape(&human_bytes(r.predicted_peak_bytes)),
                escape(&human_bytes(r.measured_peak_bytes)),
                100.0 * r.relative_error()
            ));
        }
        h.push_str("</table>\n");
    }

    if !skipped.is_empty() {
        h.push_str("<h2>Not drawn</h2>\n<ul>\n");
        for s in skipped {
            h.push_str(&format!(
                "<li><b>{}</b>: {}</li>\n",
                escape(&s.chart),
                escape(&s.reason)
            ));
        }
        h.push_str("</ul>\n");
    }

    h.push_str("<h2>Inputs</h2>\n<ul>\n");
    for s in &data.sources {
        h.push_str(&format!("<li>{}</li>\n", escape(s)));
    }
    h.push_str("</ul>\n");
    h.push_str("<footer>Rendered by <code>memtune report</code>. Memory in MiB/GiB (2<sup>20</sup>/2<sup>30</sup> bytes); throughput in tokens per second.</footer>\n</body>\n</html>\n");
    h
}
