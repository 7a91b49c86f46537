//! SVG charts of one [`ReportData`], drawn with plotters' SVG backend into strings (no fonts are read:
//! text is left to the viewer's sans-serif). Every component has one colour in every chart; everything
//! that is not a component is drawn in greys and black, so a colour always means a component.
//!
//! Charts whose data is missing are not drawn; [`render_charts`] says which and why.

use super::data::{ConfigRef, ReportData, TimelineCsvRow};
use super::profile_csv::ProfileRow;
use crate::commands::human_bytes;
use crate::probe::COMPONENT_NAMES;
use crate::search::write::CandidateRow;
use anyhow::Result;
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One colour per component, in [`COMPONENT_NAMES`] order (colour-blind-safe Tableau hues).
pub const COMPONENT_COLOURS: [RGBColor; 6] = [
    RGBColor(0x4E, 0x79, 0xA7), // weights: blue
    RGBColor(0xF2, 0x8E, 0x2B), // gradients: orange
    RGBColor(0x59, 0xA1, 0x4F), // optimizer: green
    RGBColor(0xE1, 0x57, 0x59), // activations: red
    RGBColor(0xB0, 0x7A, 0xA1), // transient: purple
    RGBColor(0xED, 0xC9, 0x48), // runtime: yellow
];

/// The colour of component `name`, if it is one.
pub fn component_colour(name: &str) -> Option<RGBColor> {
    COMPONENT_NAMES
        .iter()
        .position(|n| *n == name)
        .map(|i| COMPONENT_COLOURS[i])
}

const INK: RGBColor = RGBColor(0x22, 0x22, 0x22);
const MUTED: RGBColor = RGBColor(0x66, 0x66, 0x66);
const FAINT: RGBColor = RGBColor(0xAA, 0xAA, 0xAA);
const MARGIN_GREY: RGBColor = RGBColor(0xD4, 0xD4, 0xD4);
const SHADE: RGBColor = RGBColor(0xF1, 0xF1, 0xF1);
const FONT: &str = "sans-serif";
const WIDTH: u32 = 1100;

/// A rendered chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    /// File name in the report folder, e.g. `breakdown.svg`.
    pub file: String,
    pub title: String,
    /// One or two sentences for the page: what is drawn and from which data.
    pub caption: String,
    pub svg: String,
}

/// A chart that was not drawn, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    pub chart: String,
    pub reason: String,
}

/// Renders every chart the data allows, in page order, and names the ones it does not.
pub fn render_charts(data: &ReportData) -> Result<(Vec<Chart>, Vec<Skipped>)> {
    let mut charts = Vec::new();
    let mut skipped = Vec::new();
    let mut skip = |chart: &str, reason: &str| {
        skipped.push(Skipped {
            chart: chart.to_string(),
            reason: reason.to_string(),
        })
    };
    let candidates = configs_from_candidates(&data.candidates);
    let probes = configs_from_probes(&data.profile);
    let chosen = data.chosen.as_ref();

    if candidates.is_empty() {
        skip(
            "breakdown",
            "no candidates.csv: no predicted configurations to compare",
        );
    } else {
        charts.push(breakdown_chart(
            "breakdown.svg",
            &candidates,
            chosen,
            data.budget_bytes,
            false,
        )?);
    }
    if probes.is_empty() {
        skip(
            "measured breakdown",
            "no profile CSV: no measured probes to show",
        );
    } else {
        charts.push(breakdown_chart(
            "measured.svg",
            &probes,
            chosen,
            data.budget_bytes,
            true,
        )?);
    }

    let mut timeline_ids: Vec<&str> = Vec::new();
    for row in &data.timeline {
        if !timeline_ids.contains(&row.probe_id.as_str()) {
            timeline_ids.push(&row.probe_id);
        }
    }
    if timeline_ids.is_empty() {
        skip(
            "timeline",
            "no timeline CSV: no step was recorded mark by mark",
        );
    }
    for (i, id) in timeline_ids.iter().enumerate().take(MAX_TIMELINES) {
        let rows: Vec<&TimelineCsvRow> =
            data.timeline.iter().filter(|r| r.probe_id == *id).collect();
        let probe = probes.iter().find(|p| p.probe_id() == Some(*id));
        let file = if timeline_ids.len() == 1 {
            "timeline.svg".to_string()
        } else {
            format!("timeline-{}.svg", i + 1)
        };
        charts.push(timeline_chart(&file, id, &rows, probe)?);
    }
    if timeline_ids.len() > MAX_TIMELINES {
        skip(
            "timeline",
            &format!(
                "{} more probes' timelines not drawn (at most {MAX_TIMELINES})",
                timeline_ids.len() - MAX_TIMELINES
            ),
        );
    }

    if data.accuracy.is_empty() {
        skip(
            "accuracy",
            "no accuracy.csv: the prediction was not checked against held-out measurements",
        );
    } else {
        charts.push(accuracy_chart(data)?);
    }

    let (frontier_source, measured) = if candidates.is_empty() {
        (&probes, true)
    } else {
        (&candidates, false)
    };
    if frontier_source.len() < 2 {
        skip(
            "frontier",
            "fewer than two configurations with a throughput to compare",
        );
    } else {
        charts.push(frontier_chart(
            frontier_source,
            chosen,
            data.budget_bytes,
            measured,
        )?);
    }

    match chosen {
        None => skip(
            "knob effect",
            "no chosen configuration to vary (nothing fits, or no candidates.csv / tuned.toml)",
        ),
        Some(c) => {
            let (pool, measured) = match c {
                ConfigRef::Candidate { .. } => (&candidates, false),
                ConfigRef::Probe { .. } => (&probes, true),
            };
            match pool.iter().find(|v| v.id == *c) {
                None => skip(
                    "knob effect",
                    "the chosen configuration is not among the inputs",
                ),
                Some(base) => {
                    let alternatives = one_knob_alternatives(base, pool);
                    if alternatives.is_empty() {
                        skip(
                            "knob effect",
                            "no configuration differs from the chosen one in exactly one knob",
                        );
                    } else {
                        charts.push(knob_chart(base, &alternatives, measured)?);
                    }
                }
            }
        }
    }
    Ok((charts, skipped))
}

/// Timelines drawn at most (one chart per probe).
pub const MAX_TIMELINES: usize = 6;
/// Fitting and non-fitting predicted configurations shown in the breakdown.
const BREAKDOWN_FITTING: usize = 8;
const BREAKDOWN_OVER: usize = 4;
const BREAKDOWN_PROBES: usize = 16;

// ---------------------------------------------------------------------------------------------
// Configurations, from either source
// ---------------------------------------------------------------------------------------------

/// The knob dimensions a configuration is compared on; `""` where a knob does not apply.
const DIMENSIONS: [&str; 9] = [
    "method",
    "lora rank",
    "quantization",
    "precision",
    "checkpointing",
    "micro-batch × accumulation",
    "optimizer",
    "loss",
    "layers × seq",
];

/// One configuration, predicted (a candidate) or measured (a probe).
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigView {
    pub id: ConfigRef,
    pub label: String,
    pub knobs: [String; 9],
    pub components: [u64; 6],
    pub peak_bytes: u64,
    /// Peak plus the safety margin (the peak itself for probes).
    pub required_bytes: u64,
    pub tokens_per_s: f64,
    /// Tokens per sequence.
    pub seq: usize,
    /// Decoder layers, for probes (candidates are for the whole model).
    pub layers: Option<usize>,
    /// Whether it fits the budget, where known.
    pub fits: Option<bool>,
}

impl ConfigView {
    fn probe_id(&self) -> Option<&str> {
        match &self.id {
            ConfigRef::Probe { probe_id } => Some(probe_id),
            ConfigRef::Candidate { .. } => None,
        }
    }

    /// Whether `other` has the same knobs and sequence length (depth aside).
    pub fn same_knobs(&self, other: &ConfigView) -> bool {
        self.knobs[..8] == other.knobs[..8] && self.seq == other.seq
    }

    fn is(&self, chosen: Option<&ConfigRef>) -> bool {
        chosen == Some(&self.id)
    }
}

fn describe(knobs: &[String; 9]) -> String {
    let mut method = knobs[0].clone();
    if !knobs[2].is_empty() {
        method.push_str(&format!(" {}", knobs[2]));
    }
    if !knobs[1].is_empty() {
        method.push_str(&format!(" r{}", knobs[1]));
    }
    let mut text = format!(
        "{method} · {} · ckpt {} · {} · {} · {}",
        knobs[3], knobs[4], knobs[5], knobs[6], knobs[7]
    );
    if !knobs[8].is_empty() {
        text.push_str(&format!(" · {}", knobs[8]));
    }
    text
}

pub fn configs_from_candidates(rows: &[CandidateRow]) -> Vec<ConfigView> {
    rows.iter()
        .map(|r| {
            let knobs = [
                r.method.clone(),
                r.lora_rank.clone(),
                r.quant.clone(),
                r.precision.clone(),
                r.checkpointing.clone(),
                format!("{} × {}", r.micro_batch, r.accum),
                r.optimizer.clone(),
                r.loss.clone(),
                String::new(),
            ];
            ConfigView {
                id: ConfigRef::Candidate { rank: r.rank },
                label: format!("#{} {}", r.rank, describe(&knobs)),
                knobs,
                components: [
                    r.weights_bytes,
                    r.gradients_bytes,
                    r.optimizer_bytes,
                    r.activations_bytes,
                    r.transient_bytes,
                    r.runtime_bytes,
                ],
                peak_bytes: r.peak_bytes,
                required_bytes: r.required_bytes.max(r.peak_bytes),
                tokens_per_s: r.tokens_per_s,
                seq: r.seq,
                layers: None,
                fits: Some(r.fits),
            }
        })
        .collect()
}

/// Probes in file order, one per `probe_id`, components from their rows.
pub fn configs_from_probes(rows: &[ProfileRow]) -> Vec<ConfigView> {
    let mut views: Vec<ConfigView> = Vec::new();
    for r in rows {
        let index = match views
            .iter()
            .position(|v| v.probe_id() == Some(r.probe_id.as_str()))
        {
            Some(i) => i,
            None => {
                let full = r.method == "full";
                let knobs = [
                    r.method.clone(),
                    if full {
                        String::new()
                    } else {
                        r.rank.to_string()
                    },
                    if r.method == "qlora" {
                        r.quant.clone()
                    } else {
                        String::new()
                    },
                    r.precision.clone(),
                    r.checkpointing.clone(),
                    format!("{} × {}", r.batch, r.accum),
                    r.optimizer.clone(),
                    r.loss.clone(),
                    format!("L{} s{}", r.layers, r.seq),
                ];
                views.push(ConfigView {
                    id: ConfigRef::Probe {
                        probe_id: r.probe_id.clone(),
                    },
                    label: describe(&knobs),
                    knobs,
                    components: [0; 6],
                    peak_bytes: r.peak_bytes,
                    required_bytes: r.peak_bytes,
                    tokens_per_s: r.tokens_per_s,
                    seq: r.seq,
                    layers: Some(r.layers),
                    fits: None,
                });
                views.len() - 1
            }
        };
        if let Some(c) = COMPONENT_NAMES.iter().position(|n| *n == r.component) {
            views[index].components[c] = r.bytes;
        }
    }
    views
}

/// An alternative to the chosen configuration that differs in one knob.
#[derive(Debug, Clone, PartialEq)]
pub struct Alternative {
    pub knob: &'static str,
    /// The differing values, e.g. `qlora q4` for a method change that brings a quantization.
    pub value: String,
    pub config: ConfigView,
}

/// Configurations that differ from `base` in exactly one knob. A knob that applies to only one of
/// the two (LoRA rank under `full`, quantization outside `qlora`) follows the method and does not
/// count as a second difference.
pub fn one_knob_alternatives(base: &ConfigView, pool: &[ConfigView]) -> Vec<Alternative> {
    let mut out: Vec<Alternative> = Vec::new();
    for other in pool.iter().filter(|o| o.id != base.id) {
        let differing: Vec<usize> = (0..DIMENSIONS.len())
            .filter(|&d| other.knobs[d] != base.knobs[d])
            .collect();
        let counted: Vec<usize> = differing
            .iter()
            .copied()
            .filter(|&d| !base.knobs[d].is_empty() && !other.knobs[d].is_empty())
            .collect();
        if counted.len() != 1 {
            continue;
        }
        let value = differing
            .iter()
            .map(|&d| other.knobs[d].clone())
            .filter(|v| !v.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        out.push(Alternative {
            knob: DIMENSIONS[counted[0]],
            value,
            config: other.clone(),
        });
    }
    // Knob order first, then the order of the inputs (stable sort).
    out.sort_by_key(|a| DIMENSIONS.iter().position(|d| *d == a.knob));
    out.truncate(30);
    out
}

// ---------------------------------------------------------------------------------------------
// Drawing helpers
// ---------------------------------------------------------------------------------------------

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// A text style of `px` pixels as rendered (plotters' SVG backend divides sizes by 1.24).
fn text(px: f64, colour: &'static RGBColor) -> TextStyle<'static> {
    TextStyle::from((FONT, px * 1.24).into_font()).color(colour)
}

fn bold(px: f64, colour: &'static RGBColor) -> TextStyle<'static> {
    TextStyle::from((FONT, px * 1.24, FontStyle::Bold).into_font()).color(colour)
}

fn anchored(style: TextStyle<'static>, h: HPos, v: VPos) -> TextStyle<'static> {
    style.pos(Pos::new(h, v))
}

/// Text on a white box, so that it stays readable over lines and bars it crosses.
fn label(
    root: &Area,
    content: String,
    at: (i32, i32),
    px: f64,
    style: TextStyle<'static>,
    h: HPos,
    v: VPos,
) -> Result<()> {
    let width = text_width(&content, px);
    let x0 = match h {
        HPos::Left => at.0 - 2,
        HPos::Center => at.0 - width / 2 - 2,
        HPos::Right => at.0 - width - 2,
    };
    let height = (px * 1.25).ceil() as i32;
    let y0 = match v {
        VPos::Top => at.1 - 1,
        VPos::Center => at.1 - height / 2,
        VPos::Bottom => at.1 - height,
    };
    root.draw(&Rectangle::new(
        [(x0, y0), (x0 + width + 4, y0 + height + 1)],
        WHITE.mix(0.85).filled(),
    ))?;
    root.draw(&Text::new(content, at, anchored(style, h, v)))?;
    Ok(())
}

/// Width of `s` at `px` in an average sans-serif, for layout (an estimate: SVG text is measured by
/// the viewer).
fn text_width(s: &str, px: f64) -> i32 {
    (s.chars().count() as f64 * px * 0.52).ceil() as i32
}

/// How memory is shown on an axis: MiB below 2 GiB, else GiB.
#[derive(Debug, Clone, Copy)]
struct Unit {
    bytes: f64,
    name: &'static str,
}

fn unit_for(max_bytes: u64) -> Unit {
    if max_bytes >= 2 << 30 {
        Unit {
            bytes: (1u64 << 30) as f64,
            name: "GiB",
        }
    } else {
        Unit {
            bytes: (1u64 << 20) as f64,
            name: "MiB",
        }
    }
}

impl Unit {
    fn of(&self, bytes: u64) -> f64 {
        bytes as f64 / self.bytes
    }
}

/// Tick text for an axis spanning `span`: no more decimals than the ticks need.
fn tick(value: f64, span: f64) -> String {
    let decimals = if span >= 20.0 {
        0
    } else if span >= 2.0 {
        1
    } else if span >= 0.2 {
        2
    } else {
        3
    };
    let text = format!("{value:.decimals$}");
    // "-0" reads as a mistake.
    if text
        .trim_start_matches('-')
        .chars()
        .all(|c| c == '0' || c == '.')
    {
        text.trim_start_matches('-').to_string()
    } else {
        text
    }
}

/// A change with its sign and as many decimals as its size needs ("+12", "−0.35", "0").
fn signed(value: f64) -> String {
    let size = value.abs();
    let decimals = if size >= 10.0 {
        0
    } else if size >= 1.0 {
        1
    } else if size >= 0.1 {
        2
    } else {
        3
    };
    let digits = format!("{size:.decimals$}");
    if digits.chars().all(|c| c == '0' || c == '.') {
        "0".to_string()
    } else if value > 0.0 {
        format!("+{digits}")
    } else {
        format!("−{digits}")
    }
}

/// Legend marks.
#[derive(Debug, Clone)]
enum Mark {
    Swatch(RGBColor),
    Line(RGBColor),
    Dashed(RGBColor),
    Dot(RGBColor),
    Ring(RGBColor),
    Outline(RGBColor),
}

fn draw_mark(root: &Area, mark: &Mark, x: i32, y: i32) -> Result<()> {
    match mark {
        Mark::Swatch(c) => {
            root.draw(&Rectangle::new([(x, y - 6), (x + 16, y + 6)], c.filled()))?;
        }
        Mark::Line(c) => {
            root.draw(&PathElement::new(
                vec![(x, y), (x + 18, y)],
                c.stroke_width(2),
            ))?;
        }
        Mark::Dashed(c) => {
            root.draw(&DashedPathElement::new(
                vec![(x, y), (x + 18, y)],
                4,
                3,
                c.stroke_width(2),
            ))?;
        }
        Mark::Dot(c) => {
            root.draw(&Circle::new((x + 8, y), 4, c.filled()))?;
        }
        Mark::Ring(c) => {
            root.draw(&Circle::new((x + 8, y), 6, c.stroke_width(2)))?;
        }
        Mark::Outline(c) => {
            root.draw(&Rectangle::new(
                [(x, y - 6), (x + 16, y + 6)],
                c.stroke_width(2),
            ))?;
        }
    }
    Ok(())
}

/// Title, subtitle and legend rows at the top; returns the height used.
fn draw_header(root: &Area, title: &str, subtitle: &str, legend: &[(String, Mark)]) -> Result<i32> {
    let width = root.dim_in_pixel().0 as i32;
    root.draw(&Text::new(
        title.to_string(),
        (20, 12),
        anchored(bold(19.0, &INK), HPos::Left, VPos::Top),
    ))?;
    let mut y = 40;
    if !subtitle.is_empty() {
        root.draw(&Text::new(
            subtitle.to_string(),
            (20, y),
            anchored(text(13.0, &MUTED), HPos::Left, VPos::Top),
        ))?;
        y += 22;
    }
    let mut x = 20;
    y += 10;
    for (label, mark) in legend {
        let item = 24 + text_width(label, 13.0) + 22;
        if x + item > width - 20 && x > 20 {
            x = 20;
            y += 22;
        }
        draw_mark(root, mark, x, y)?;
        root.draw(&Text::new(
            label.clone(),
            (x + 24, y),
            anchored(text(13.0, &INK), HPos::Left, VPos::Center),
        ))?;
        x += item;
    }
    Ok(y + 16)
}

fn component_legend() -> Vec<(String, Mark)> {
    COMPONENT_NAMES
        .iter()
        .zip(COMPONENT_COLOURS)
        .map(|(n, c)| (n.to_string(), Mark::Swatch(c)))
        .collect()
}

fn svg_of(
    width: u32,
    height: u32,
    draw: impl for<'a> FnOnce(&Area<'a>) -> Result<()>,
) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root)?;
        root.present()?;
    }
    Ok(svg)
}

fn axis_label_style() -> TextStyle<'static> {
    text(13.0, &INK)
}

fn axis_desc_style() -> TextStyle<'static> {
    text(14.0, &INK)
}

// ---------------------------------------------------------------------------------------------
// Breakdown: stacked components per configuration
// ---------------------------------------------------------------------------------------------

fn breakdown_rows<'a>(
    configs: &'a [ConfigView],
    chosen: Option<&ConfigRef>,
    measured: bool,
) -> Vec<&'a ConfigView> {
    if measured {
        return configs.iter().take(BREAKDOWN_PROBES).collect();
    }
    let mut rows: Vec<&ConfigView> = Vec::new();
    if let Some(c) = configs.iter().find(|c| c.is(chosen)) {
        rows.push(c);
    }
    for c in configs.iter().filter(|c| c.fits == Some(true)) {
        if rows.len() >= BREAKDOWN_FITTING {
            break;
        }
        if !rows.iter().any(|r| r.id == c.id) {
            rows.push(c);
        }
    }
    let mut over: Vec<&ConfigView> = configs.iter().filter(|c| c.fits != Some(true)).collect();
    over.sort_by_key(|c| c.required_bytes);
    rows.extend(
        over.into_iter()
            .filter(|c| !c.is(chosen))
            .take(BREAKDOWN_OVER),
    );
    rows
}

fn breakdown_chart(
    file: &str,
    configs: &[ConfigView],
    chosen: Option<&ConfigRef>,
    budget: Option<u64>,
    measured: bool,
) -> Result<Chart> {
    let rows = breakdown_rows(configs, chosen, measured);
    let n = rows.len();
    let max_bytes = rows
        .iter()
        .map(|r| r.required_bytes.max(r.components.iter().sum()))
        .chain(budget)
        .max()
        .unwrap_or(1)
        .max(1);
    let unit = unit_for(max_bytes);
    let x_max = unit.of(max_bytes) * 1.04;
    // What each bar means, written after its end (in the right margin when the bar is the longest).
    let notes: Vec<String> = rows
        .iter()
        .map(|row| {
            let mut note = if measured {
                format!("peak {}", human_bytes(row.peak_bytes))
            } else {
                format!("needs {}", human_bytes(row.required_bytes))
            };
            note.push_str(&format!(" · {:.0} tokens/s", row.tokens_per_s));
            if row.fits == Some(false) {
                note.push_str(" · does not fit");
            }
            if row.is(chosen) {
                note.push_str(" · chosen");
            }
            note
        })
        .collect();
    let note_width = notes.iter().map(|n| text_width(n, 12.0)).max().unwrap_or(0) + 24;
    let label_width = rows
        .iter()
        .map(|r| text_width(&r.label, 13.0))
        .max()
        .unwrap_or(100)
        .clamp(120, 520)
        + 16;
    let title = if measured {
        "Measured memory by component, per probe".to_string()
    } else {
        "Predicted memory by component, per configuration".to_string()
    };
    let subtitle = if measured {
        format!(
            "{} probe(s){}; components at the measured peak, the peak itself marked",
            n,
            if configs.len() > n {
                format!(" of {}", configs.len())
            } else {
                String::new()
            }
        )
    } else {
        format!(
            "{n} of {} configurations: the chosen one, the fastest that fit, the smallest that do not",
            configs.len()
        )
    };
    let mut legend = component_legend();
    if measured {
        legend.push(("measured peak".into(), Mark::Line(INK)));
    } else {
        legend.push(("safety margin".into(), Mark::Swatch(MARGIN_GREY)));
    }
    if budget.is_some() {
        legend.push(("budget".into(), Mark::Dashed(INK)));
    }
    if rows.iter().any(|r| r.is(chosen)) {
        legend.push(("chosen".into(), Mark::Outline(INK)));
    }
    let height = 150 + 60 + 34 * n as u32;
    let svg = svg_of(WIDTH, height, |root| {
        let top = draw_header(root, &title, &subtitle, &legend)?;
        let (_, body) = root.split_vertically(top);
        let mut chart = ChartBuilder::on(&body)
            .margin_right(note_width)
            .margin_top(26)
            .x_label_area_size(50)
            .y_label_area_size(label_width)
            .build_cartesian_2d(0f64..x_max, 0f64..n as f64)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(0)
            .x_labels(8)
            .x_label_formatter(&|v| tick(*v, x_max))
            .x_desc(format!("memory ({})", unit.name))
            .label_style(axis_label_style())
            .axis_desc_style(axis_desc_style())
            .max_light_lines(0)
            .bold_line_style(RGBColor(0xE4, 0xE4, 0xE4))
            .draw()?;
        let mut note_at: Vec<(i32, i32, bool)> = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            let y = (n - 1 - i) as f64;
            let (y0, y1) = (y + 0.18, y + 0.82);
            let mut at = 0u64;
            for (c, bytes) in row.components.iter().enumerate() {
                if *bytes == 0 {
                    continue;
                }
                chart.draw_series(std::iter::once(Rectangle::new(
                    [(unit.of(at), y0), (unit.of(at + bytes), y1)],
                    COMPONENT_COLOURS[c].filled(),
                )))?;
                at += bytes;
            }
            let mut end = at;
            if !measured && row.required_bytes > at {
                chart.draw_series(std::iter::once(Rectangle::new(
                    [(unit.of(at), y0), (unit.of(row.required_bytes), y1)],
                    MARGIN_GREY.filled(),
                )))?;
                end = row.required_bytes;
            }
            if measured {
                let p = unit.of(row.peak_bytes);
                chart.draw_series(std::iter::once(PathElement::new(
                    vec![(p, y0 - 0.1), (p, y1 + 0.1)],
                    INK.stroke_width(3),
                )))?;
                end = end.max(row.peak_bytes);
            }
            let is_chosen = row.is(chosen);
            if is_chosen {
                chart.draw_series(std::iter::once(Rectangle::new(
                    [(0.0, y0 - 0.06), (unit.of(end), y1 + 0.06)],
                    INK.stroke_width(2),
                )))?;
            }
            // Row label at the left, in the label area.
            let (px, py) = chart.backend_coord(&(0.0, y + 0.5));
            let style = if is_chosen {
                bold(13.0, &INK)
            } else {
                text(13.0, &INK)
            };
            root.draw(&Text::new(
                row.label.clone(),
                (px - 8, py),
                anchored(style, HPos::Right, VPos::Center),
            ))?;
            let (ex, _) = chart.backend_coord(&(unit.of(end), y));
            note_at.push((ex + 8, py, is_chosen));
        }
        // The budget over the bars, the notes over the budget.
        if let Some(b) = budget {
            let x = unit.of(b);
            chart.draw_series(std::iter::once(DashedPathElement::new(
                vec![(x, 0.0), (x, n as f64)],
                6,
                4,
                INK.stroke_width(2),
            )))?;
            let (bx, by) = chart.backend_coord(&(x, n as f64));
            root.draw(&Text::new(
                format!("budget {}", human_bytes(b)),
                (bx, by - 4),
                anchored(bold(12.0, &INK), HPos::Center, VPos::Bottom),
            ))?;
        }
        for ((x, y, is_chosen), note) in note_at.into_iter().zip(&notes) {
            let style = if is_chosen {
                bold(12.0, &INK)
            } else {
                text(12.0, &MUTED)
            };
            label(
                root,
                note.clone(),
                (x, y),
                12.0,
                style,
                HPos::Left,
                VPos::Center,
            )?;
        }
        Ok(())
    })?;
    let caption = if measured {
        "Each bar is one measured probe: what was live at its peak, by component. The black tick is \
         the measured peak, which is read, not summed."
            .to_string()
    } else {
        "Each bar is one configuration as the cost model predicts it at its peak; the grey tail is the \
         safety margin, and a configuration fits when the whole bar stays left of the budget."
            .to_string()
    };
    Ok(Chart {
        file: file.to_string(),
        title,
        caption,
        svg,
    })
}

// ---------------------------------------------------------------------------------------------
// Timeline: memory over one step
// ---------------------------------------------------------------------------------------------

/// The phase a mark closes, for shading: recomputation belongs to the backward pass.
fn phase_group(phase: &str) -> Option<&'static str> {
    match phase {
        "forward" => Some("forward"),
        "loss" => Some("loss"),
        "backward" | "recompute" | "micro_batch_done" => Some("backward"),
        p if p == "clip" || p.starts_with("optimizer_step") => Some("optimizer step"),
        _ => None,
    }
}

struct Span {
    group: &'static str,
    micro_batch: usize,
    from: f64,
    to: f64,
}

fn phase_spans(rows: &[&TimelineCsvRow], t0: f64) -> Vec<Span> {
    let mut spans: Vec<Span> = Vec::new();
    let mut previous = 0.0;
    for row in rows {
        let t = row.t_s - t0;
        if let Some(group) = phase_group(&row.phase) {
            match spans.last_mut() {
                Some(s) if s.group == group && s.micro_batch == row.micro_batch => s.to = t,
                _ => spans.push(Span {
                    group,
                    micro_batch: row.micro_batch,
                    from: previous,
                    to: t,
                }),
            }
        }
        previous = t;
    }
    spans
}

fn timeline_chart(
    file: &str,
    probe_id: &str,
    rows: &[&TimelineCsvRow],
    probe: Option<&ConfigView>,
) -> Result<Chart> {
    let t0 = rows.first().map(|r| r.t_s).unwrap_or(0.0);
    let t_end = rows.iter().map(|r| r.t_s - t0).fold(0.0, f64::max);
    let (time_scale, time_unit) = if t_end < 1.0 {
        (1000.0, "ms")
    } else {
        (1.0, "s")
    };
    let x_max = (t_end * time_scale).max(1e-9) * 1.02;
    let peak = rows
        .iter()
        .map(|r| r.peak_bytes.max(r.current_bytes))
        .max()
        .unwrap_or(0);
    let unit = unit_for(peak.max(1));
    let y_max = unit.of(peak.max(1)) * 1.22;
    let micro_batches = rows.iter().map(|r| r.micro_batch).max().unwrap_or(0) + 1;
    // Weights, optimizer state and runtime live through the whole step.
    let fixed: Vec<(usize, u64)> = probe
        .map(|p| {
            [0usize, 2, 5]
                .into_iter()
                .map(|c| (c, p.components[c]))
                .filter(|(_, b)| *b > 0)
                .collect()
        })
        .unwrap_or_default();
    let fixed_total: u64 = fixed.iter().map(|(_, b)| b).sum();
    let peak_row = rows.iter().find(|r| r.peak_bytes >= peak).copied();

    let title = "Memory over one training step".to_string();
    let subtitle = format!(
        "{}{}; the meter read at each phase mark{}",
        probe
            .map(|p| p.label.clone())
            .unwrap_or_else(|| probe_id.to_string()),
        if micro_batches > 1 {
            format!(", {micro_batches} micro-batches")
        } else {
            String::new()
        },
        if fixed.is_empty() {
            " (no profile row for this probe: fixed components not shown)"
        } else {
            ""
        }
    );
    let mut legend: Vec<(String, Mark)> = fixed
        .iter()
        .map(|(c, _)| {
            (
                format!("{} (whole step)", COMPONENT_NAMES[*c]),
                Mark::Swatch(COMPONENT_COLOURS[*c]),
            )
        })
        .collect();
    legend.push(("in use at the mark".into(), Mark::Line(INK)));
    legend.push(("peak so far".into(), Mark::Dashed(MUTED)));
    legend.push(("peak".into(), Mark::Ring(INK)));
    let height = 560;
    let x = |t: f64| (t - t0) * time_scale;
    let svg = svg_of(WIDTH, height, |root| {
        let top = draw_header(root, &title, &subtitle, &legend)?;
        let (_, body) = root.split_vertically(top);
        let mut chart = ChartBuilder::on(&body)
            .margin_right(40)
            .margin_top(10)
            .x_label_area_size(50)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
        // Phase shading first, under everything.
        let spans = phase_spans(rows, t0);
        for s in &spans {
            let (a, b) = (s.from * time_scale, s.to * time_scale);
            // Forward and the loss shaded, backward and the update plain, so a phase looks the same
            // in every micro-batch.
            let shade = match s.group {
                "forward" => Some(SHADE),
                "loss" => Some(RGBColor(0xE2, 0xE2, 0xE2)),
                _ => None,
            };
            if let Some(shade) = shade {
                chart.draw_series(std::iter::once(Rectangle::new(
                    [(a, 0.0), (b, y_max)],
                    shade.filled(),
                )))?;
            }
        }
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(10)
            .y_labels(8)
            .x_label_formatter(&|v| tick(*v, x_max))
            .y_label_formatter(&|v| tick(*v, y_max))
            .x_desc(format!("time in the step ({time_unit})"))
            .y_desc(format!("memory ({})", unit.name))
            .label_style(axis_label_style())
            .axis_desc_style(axis_desc_style())
            .max_light_lines(0)
            .bold_line_style(RGBColor(0xE4, 0xE4, 0xE4))
            .draw()?;
        // Phase names where they fit, at the top of their span.
        for s in &spans {
            let (a, _) = chart.backend_coord(&(s.from * time_scale, y_max));
            let (b, top) = chart.backend_coord(&(s.to * time_scale, y_max));
            let name = if micro_batches > 1 && s.group != "optimizer step" {
                format!("{} {}", s.group, s.micro_batch)
            } else {
                s.group.to_string()
            };
            let name = if b - a >= text_width(&name, 12.0) + 6 {
                name
            } else if b - a >= text_width(&s.group[..1], 12.0) + 4 {
                s.group[..1].to_string()
            } else {
                continue;
            };
            root.draw(&Text::new(
                name,
                ((a + b) / 2, top + 6),
                anchored(text(12.0, &MUTED), HPos::Center, VPos::Top),
            ))?;
        }
        // Fixed components as bands.
        let mut at = 0u64;
        for (c, bytes) in &fixed {
            chart.draw_series(std::iter::once(Rectangle::new(
                [(0.0, unit.of(at)), (x_max, unit.of(at + bytes))],
                COMPONENT_COLOURS[*c].mix(0.85).filled(),
            )))?;
            at += bytes;
        }
        // Everything above the fixed components at each mark: activations, gradients, transient.
        if fixed_total > 0 {
            let mut outline: Vec<(f64, f64)> = rows
                .iter()
                .map(|r| (x(r.t_s), unit.of(r.current_bytes.max(fixed_total))))
                .collect();
            outline.push((x(rows[rows.len() - 1].t_s), unit.of(fixed_total)));
            outline.push((x(rows[0].t_s), unit.of(fixed_total)));
            chart.draw_series(std::iter::once(Polygon::new(
                outline,
                RGBColor(0xDD, 0xDD, 0xDD).filled(),
            )))?;
        }
        // The running peak as a step line, then the current reading.
        let mut steps: Vec<(f64, f64)> = Vec::new();
        for r in rows {
            if let Some(&(_, last)) = steps.last() {
                steps.push((x(r.t_s), last));
            }
            steps.push((x(r.t_s), unit.of(r.peak_bytes)));
        }
        chart.draw_series(std::iter::once(DashedPathElement::new(
            steps,
            5,
            4,
            MUTED.stroke_width(2),
        )))?;
        chart.draw_series(LineSeries::new(
            rows.iter().map(|r| (x(r.t_s), unit.of(r.current_bytes))),
            INK.stroke_width(2),
        ))?;
        chart.draw_series(
            rows.iter()
                .map(|r| Circle::new((x(r.t_s), unit.of(r.current_bytes)), 3, INK.filled())),
        )?;
        if let Some(p) = peak_row {
            let at = (x(p.t_s), unit.of(peak));
            chart.draw_series(std::iter::once(Circle::new(at, 8, INK.stroke_width(2))))?;
            let (px, py) = chart.backend_coord(&at);
            let words = format!("peak {} (by the {} mark)", human_bytes(peak), mark_name(p));
            let right = px + 12 + text_width(&words, 13.0) < WIDTH as i32 - 20;
            label(
                root,
                words,
                if right {
                    (px + 12, py - 10)
                } else {
                    (px - 12, py - 10)
                },
                13.0,
                bold(13.0, &INK),
                if right { HPos::Left } else { HPos::Right },
                VPos::Bottom,
            )?;
        }
        Ok(())
    })?;
    Ok(Chart {
        file: file.to_string(),
        title: format!("{title}: {}", probe.map(|p| p.label.as_str()).unwrap_or(probe_id)),
        caption: "The black line is memory in use at each mark (forward layer by layer, the loss, \
                  backward, the optimizer step, per micro-batch); the dashed line is the running peak, \
                  which also catches what lived only between two marks. Coloured bands are the \
                  components that live through the whole step; the grey area above them is \
                  activations, gradients and short-lived buffers."
            .to_string(),
        svg,
    })
}

fn mark_name(row: &TimelineCsvRow) -> String {
    match row.layer {
        Some(l) => format!("{} layer {l}", row.phase),
        None => row.phase.clone(),
    }
}

// ---------------------------------------------------------------------------------------------
// Accuracy: predicted against measured
// ---------------------------------------------------------------------------------------------

/// Median and worst |relative error| of the accuracy rows, and the worst row's label.
pub fn accuracy_summary(data: &ReportData) -> Option<(f64, f64, String)> {
    if data.accuracy.is_empty() {
        return None;
    }
    let mut errors: Vec<f64> = data
        .accuracy
        .iter()
        .map(|r| r.relative_error().abs())
        .collect();
    errors.sort_by(f64::total_cmp);
    let mid = errors.len() / 2;
    let median = if errors.len() % 2 == 1 {
        errors[mid]
    } else {
        0.5 * (errors[mid - 1] + errors[mid])
    };
    let worst = data.accuracy.iter().max_by(|a, b| {
        a.relative_error()
            .abs()
            .total_cmp(&b.relative_error().abs())
    })?;
    Some((median, worst.relative_error().abs(), worst.label.clone()))
}

fn accuracy_chart(data: &ReportData) -> Result<Chart> {
    let (median, worst, worst_label) = accuracy_summary(data).unwrap_or((0.0, 0.0, String::new()));
    let max_bytes = data
        .accuracy
        .iter()
        .map(|r| r.predicted_peak_bytes.max(r.measured_peak_bytes))
        .max()
        .unwrap_or(1)
        .max(1);
    let unit = unit_for(max_bytes);
    let top = unit.of(max_bytes) * 1.08;
    let min_bytes = data
        .accuracy
        .iter()
        .map(|r| r.predicted_peak_bytes.min(r.measured_peak_bytes))
        .min()
        .unwrap_or(0);
    // Start at zero unless that leaves most of the square empty.
    let low = if unit.of(min_bytes) < 0.4 * top {
        0.0
    } else {
        unit.of(min_bytes) * 0.9
    };
    let n = data.accuracy.len();
    let title = format!("Predicted vs measured peak, {n} configuration(s) not used in fitting");
    let subtitle = format!(
        "median |error| {:.1}%, worst {:.1}% ({worst_label})",
        100.0 * median,
        100.0 * worst
    );
    let legend = vec![
        ("configuration".to_string(), Mark::Dot(INK)),
        ("y = x (exact)".to_string(), Mark::Line(MUTED)),
        (
            format!("± median |error| ({:.1}%)", 100.0 * median),
            Mark::Swatch(RGBColor(0xE2, 0xE2, 0xE2)),
        ),
    ];
    let svg = svg_of(820, 780, |root| {
        let header = draw_header(root, &title, &subtitle, &legend)?;
        let (_, body) = root.split_vertically(header);
        let mut chart = ChartBuilder::on(&body)
            .margin_right(40)
            .margin_top(10)
            .x_label_area_size(50)
            .y_label_area_size(80)
            .build_cartesian_2d(low..top, low..top)?;
        chart
            .configure_mesh()
            .x_labels(8)
            .y_labels(8)
            .x_label_formatter(&|v| tick(*v, top - low))
            .y_label_formatter(&|v| tick(*v, top - low))
            .x_desc(format!("measured peak ({})", unit.name))
            .y_desc(format!("predicted peak ({})", unit.name))
            .label_style(axis_label_style())
            .axis_desc_style(axis_desc_style())
            .max_light_lines(0)
            .bold_line_style(RGBColor(0xEC, 0xEC, 0xEC))
            .draw()?;
        // The band between y = x(1 − e) and y = x(1 + e), cut to the square.
        let e = median.min(0.99);
        chart.draw_series(std::iter::once(Polygon::new(
            vec![
                (low, low * (1.0 + e)),
                (top / (1.0 + e), top),
                (top, top),
                (top, top * (1.0 - e)),
                (low / (1.0 - e), low),
                (low, low),
            ],
            RGBColor(0xE2, 0xE2, 0xE2).mix(0.8).filled(),
        )))?;
        chart.draw_series(LineSeries::new(
            vec![(low, low), (top, top)],
            MUTED.stroke_width(1),
        ))?;
        chart.draw_series(data.accuracy.iter().map(|r| {
            Circle::new(
                (
                    unit.of(r.measured_peak_bytes),
                    unit.of(r.predicted_peak_bytes),
                ),
                5,
                INK.filled(),
            )
        }))?;
        Ok(())
    })?;
    Ok(Chart {
        file: "accuracy.svg".to_string(),
        title,
        caption: "Each dot is a configuration the cost model predicted without having been fitted to \
                  it, against what a probe measured. On the line the prediction is exact; above it, \
                  the model over-estimates (safe), below it, it under-estimates."
            .to_string(),
        svg,
    })
}

// ---------------------------------------------------------------------------------------------
// Frontier: throughput against memory
// ---------------------------------------------------------------------------------------------

fn frontier_chart(
    configs: &[ConfigView],
    chosen: Option<&ConfigRef>,
    budget: Option<u64>,
    measured: bool,
) -> Result<Chart> {
    let max_bytes = configs
        .iter()
        .map(|c| c.required_bytes)
        .chain(budget)
        .max()
        .unwrap_or(1)
        .max(1);
    let unit = unit_for(max_bytes);
    let x_max = unit.of(max_bytes) * 1.08;
    let y_max = configs
        .iter()
        .map(|c| c.tokens_per_s)
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.18;
    let fits = |c: &ConfigView| match (c.fits, budget) {
        (Some(f), _) => Some(f),
        (None, Some(b)) => Some(c.required_bytes <= b),
        (None, None) => None,
    };
    // The frontier: configurations no other one beats on both memory and speed.
    let mut by_memory: Vec<&ConfigView> = configs.iter().collect();
    by_memory.sort_by(|a, b| {
        a.required_bytes
            .cmp(&b.required_bytes)
            .then(b.tokens_per_s.total_cmp(&a.tokens_per_s))
    });
    let mut frontier: Vec<(f64, f64)> = Vec::new();
    let mut best = f64::NEG_INFINITY;
    for c in by_memory {
        if c.tokens_per_s > best {
            let point = (unit.of(c.required_bytes), c.tokens_per_s);
            if let Some(&(_, last_y)) = frontier.last() {
                frontier.push((point.0, last_y));
            }
            frontier.push(point);
            best = c.tokens_per_s;
        }
    }
    let x_what = if measured {
        "measured peak"
    } else {
        "predicted peak + margin"
    };
    let title = format!(
        "Throughput vs memory, {} {}",
        configs.len(),
        if measured {
            "measured probes"
        } else {
            "evaluated configurations"
        }
    );
    let fitting = configs.iter().filter(|c| fits(c) == Some(true)).count();
    let subtitle = match budget {
        Some(b) => format!(
            "{fitting} of {} fit the budget of {}",
            configs.len(),
            human_bytes(b)
        ),
        None => "no budget given: fitting not judged".to_string(),
    };
    let judged = configs.iter().any(|c| fits(c).is_some());
    let mut legend = if judged {
        vec![
            ("fits".to_string(), Mark::Dot(INK)),
            ("does not fit".to_string(), Mark::Ring(FAINT)),
        ]
    } else {
        vec![("probe".to_string(), Mark::Dot(INK))]
    };
    legend.push((
        "frontier (best speed at this memory)".to_string(),
        Mark::Line(MUTED),
    ));
    if budget.is_some() {
        legend.push(("budget".into(), Mark::Dashed(INK)));
    }
    if configs.iter().any(|c| c.is(chosen)) {
        legend.push(("chosen".into(), Mark::Ring(INK)));
    }
    let svg = svg_of(WIDTH, 640, |root| {
        let header = draw_header(root, &title, &subtitle, &legend)?;
        let (_, body) = root.split_vertically(header);
        let mut chart = ChartBuilder::on(&body)
            .margin_right(40)
            .margin_left(10)
            .margin_top(10)
            .x_label_area_size(50)
            .y_label_area_size(90)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
        chart
            .configure_mesh()
            .x_labels(10)
            .y_labels(8)
            .x_label_formatter(&|v| tick(*v, x_max))
            .y_label_formatter(&|v| tick(*v, y_max))
            .x_desc(format!("{x_what} ({})", unit.name))
            .y_desc("throughput (tokens/s)")
            .label_style(axis_label_style())
            .axis_desc_style(axis_desc_style())
            .max_light_lines(0)
            .bold_line_style(RGBColor(0xEC, 0xEC, 0xEC))
            .draw()?;
        chart.draw_series(LineSeries::new(frontier.clone(), MUTED.stroke_width(1)))?;
        let point = |c: &ConfigView| (unit.of(c.required_bytes), c.tokens_per_s);
        chart.draw_series(
            configs
                .iter()
                .filter(|c| fits(c) == Some(false))
                .map(|c| Circle::new(point(c), 4, FAINT.stroke_width(1))),
        )?;
        chart.draw_series(
            configs
                .iter()
                .filter(|c| fits(c) != Some(false))
                .map(|c| Circle::new(point(c), 4, INK.filled())),
        )?;
        if let Some(b) = budget {
            let x = unit.of(b);
            chart.draw_series(std::iter::once(DashedPathElement::new(
                vec![(x, 0.0), (x, y_max)],
                6,
                4,
                INK.stroke_width(2),
            )))?;
            let (bx, by) = chart.backend_coord(&(x, 0.0));
            label(
                root,
                format!("budget {}", human_bytes(b)),
                (bx + 6, by - 6),
                12.0,
                bold(12.0, &INK),
                HPos::Left,
                VPos::Bottom,
            )?;
        }
        if let Some(c) = configs.iter().find(|c| c.is(chosen)) {
            let at = point(c);
            chart.draw_series(std::iter::once(Circle::new(at, 10, INK.stroke_width(3))))?;
            let (px, py) = chart.backend_coord(&at);
            let words = format!(
                "chosen: {:.0} tokens/s, {}",
                c.tokens_per_s,
                human_bytes(c.required_bytes)
            );
            let right = px + 16 + text_width(&words, 13.0) < WIDTH as i32 - 40;
            label(
                root,
                words,
                if right {
                    (px + 16, py - 14)
                } else {
                    (px - 16, py - 14)
                },
                13.0,
                bold(13.0, &INK),
                if right { HPos::Left } else { HPos::Right },
                VPos::Bottom,
            )?;
        }
        Ok(())
    })?;
    Ok(Chart {
        file: "frontier.svg".to_string(),
        title,
        caption: if measured {
            "Each dot is a measured probe: its peak and its throughput.".to_string()
        } else {
            "Each dot is a configuration the search evaluated, at its predicted memory (with the \
             safety margin) and speed. The chosen one is the highest dot left of the budget."
                .to_string()
        },
        svg,
    })
}

// ---------------------------------------------------------------------------------------------
// Knob effect: one knob at a time from the chosen configuration
// ---------------------------------------------------------------------------------------------

fn knob_chart(base: &ConfigView, alternatives: &[Alternative], measured: bool) -> Result<Chart> {
    let n = alternatives.len();
    let max_bytes = alternatives
        .iter()
        .map(|a| a.config.required_bytes.abs_diff(base.required_bytes))
        .max()
        .unwrap_or(1)
        .max(1);
    let unit = unit_for(max_bytes);
    let memory: Vec<f64> = alternatives
        .iter()
        .map(|a| unit.of(a.config.required_bytes) - unit.of(base.required_bytes))
        .collect();
    let speed: Vec<f64> = alternatives
        .iter()
        .map(|a| a.config.tokens_per_s - base.tokens_per_s)
        .collect();
    let range = |v: &[f64]| {
        let lo = v.iter().copied().fold(0.0, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        let pad = ((hi - lo) * 0.45).max(1e-9);
        (if lo < 0.0 { lo - pad } else { -pad * 0.15 })..(if hi > 0.0 {
            hi + pad
        } else {
            pad * 0.15
        })
    };
    let (memory_range, speed_range) = (range(&memory), range(&speed));
    let labels: Vec<String> = alternatives
        .iter()
        .map(|a| format!("{}: {}", a.knob, a.value))
        .collect();
    let label_width = labels
        .iter()
        .map(|l| text_width(l, 13.0))
        .max()
        .unwrap_or(100)
        .clamp(120, 360)
        + 16;
    let title = "What each knob's alternatives cost and gain".to_string();
    let subtitle = format!(
        "from the chosen configuration ({}, {} · {:.0} tokens/s), changing one knob at a time",
        base.label,
        human_bytes(base.required_bytes),
        base.tokens_per_s
    );
    let legend = vec![
        ("fits".to_string(), Mark::Swatch(RGBColor(0x55, 0x55, 0x55))),
        (
            "does not fit".to_string(),
            Mark::Swatch(RGBColor(0xC8, 0xC8, 0xC8)),
        ),
    ];
    let memory_what = if measured { "peak" } else { "memory needed" };
    let height = 150 + 70 + 32 * n as u32;
    let svg = svg_of(WIDTH, height, |root| {
        let header = draw_header(root, &title, &subtitle, &legend)?;
        let (_, body) = root.split_vertically(header);
        let split = label_width + (WIDTH as i32 - label_width) / 2;
        let (left, right) = body.split_horizontally(split);
        let panels = [
            (
                &left,
                label_width,
                memory_range.clone(),
                &memory,
                format!("change in {memory_what} ({})", unit.name),
            ),
            (
                &right,
                20,
                speed_range.clone(),
                &speed,
                "change in throughput (tokens/s)".to_string(),
            ),
        ];
        for (p, (area, label_area, x_range, values, desc)) in panels.into_iter().enumerate() {
            let span = x_range.end - x_range.start;
            let mut chart = ChartBuilder::on(area)
                .margin_right(if p == 0 { 30 } else { 70 })
                .margin_top(10)
                .x_label_area_size(50)
                .y_label_area_size(label_area)
                .build_cartesian_2d(x_range.clone(), 0f64..n as f64)?;
            chart
                .configure_mesh()
                .disable_y_mesh()
                .y_labels(0)
                .x_labels(6)
                .x_label_formatter(&|v| tick(*v, span))
                .x_desc(desc)
                .label_style(axis_label_style())
                .axis_desc_style(axis_desc_style())
                .max_light_lines(0)
                .bold_line_style(RGBColor(0xEC, 0xEC, 0xEC))
                .draw()?;
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(0.0, 0.0), (0.0, n as f64)],
                INK.stroke_width(1),
            )))?;
            for (i, a) in alternatives.iter().enumerate() {
                let y = (n - 1 - i) as f64;
                let v = values[i];
                let colour = if a.config.fits == Some(false) {
                    RGBColor(0xC8, 0xC8, 0xC8)
                } else {
                    RGBColor(0x55, 0x55, 0x55)
                };
                chart.draw_series(std::iter::once(Rectangle::new(
                    [(0.0, y + 0.2), (v, y + 0.8)],
                    colour.filled(),
                )))?;
                let (ex, ey) = chart.backend_coord(&(v, y + 0.5));
                let note = if p == 0 {
                    format!("{} {}", signed(v), unit.name)
                } else if base.tokens_per_s > 0.0 {
                    format!("{} ({}%)", signed(v), signed(100.0 * v / base.tokens_per_s))
                } else {
                    signed(v)
                };
                let (x, h) = if v >= 0.0 {
                    (ex + 6, HPos::Left)
                } else {
                    (ex - 6, HPos::Right)
                };
                label(
                    root,
                    note,
                    (x, ey),
                    12.0,
                    text(12.0, &MUTED),
                    h,
                    VPos::Center,
                )?;
                if p == 0 {
                    let (lx, _) = chart.backend_coord(&(x_range.start, y));
                    root.draw(&Text::new(
                        labels[i].clone(),
                        (lx - 8, ey),
                        anchored(text(13.0, &INK), HPos::Right, VPos::Center),
                    ))?;
                }
            }
        }
        Ok(())
    })?;
    Ok(Chart {
        file: "knobs.svg".to_string(),
        title,
        caption: format!(
            "Each row is a {} that differs from the chosen one in a single knob: how much more \
             (right) or less (left) memory it needs, and how much faster or slower it runs.",
            if measured {
                "measured probe"
            } else {
                "predicted configuration"
            }
        ),
        svg,
    })
}
