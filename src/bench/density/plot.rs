//! `density.png`: start latency and host memory per pod against the pod's start order
//! (1..N), every runtime of the run side by side, and, for pods with the shim's start
//! timeline, a stacked bar per pod of where its start time went (plotters, bitmap backend).
//!
//! Text goes through `ab_glyph` with DejaVu Sans read at run time (Debian package
//! fonts-dejavu-core, installed by `make deps`): no fontconfig/freetype needed.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::CoordTranslate;
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::report::{Report, TARGET_OVERHEAD_MIB, TARGET_TOTAL_MIB};

/// The TTF font used for the plot's text.
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Errors drawing the plot.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("cannot load the plot font {FONT}: {0} (install fonts-dejavu-core: `make deps`)")]
    Font(String),
    #[error("cannot draw {path}: {detail}")]
    Draw { path: String, detail: String },
}

fn ensure_font() -> Result<(), PlotError> {
    static FONT_LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    FONT_LOADED
        .get_or_init(|| {
            let bytes = std::fs::read(FONT).map_err(|e| e.to_string())?;
            // Registered once per process; plotters needs the bytes for 'static.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| "not a usable TrueType font".to_string())
        })
        .clone()
        .map_err(PlotError::Font)
}

/// One colour per kind of run, by its name's start: runc blue, a cold podvisor boot orange,
/// the template build purple, other podvisor runs (clones) red, anything else grey.
fn colour(runtime: &str) -> RGBColor {
    if runtime.starts_with("runc") {
        RGBColor(31, 119, 180)
    } else if runtime.starts_with("podvisor-cold") {
        RGBColor(255, 127, 14)
    } else if runtime.starts_with("podvisor (template") {
        RGBColor(148, 103, 189)
    } else if runtime.starts_with("podvisor") {
        RGBColor(214, 39, 40)
    } else {
        RGBColor(90, 90, 90)
    }
}

type Series = Vec<(String, RGBColor, Vec<(f64, f64)>)>;

/// (runtime, colour, (pod #, value)) for every runtime, pods without a value skipped.
fn series(report: &Report, value: impl Fn(&super::report::PodRecord) -> Option<f64>) -> Series {
    report
        .runs
        .iter()
        .map(|r| {
            let pts = r
                .pods
                .iter()
                .filter(|p| p.error.is_none())
                .filter_map(|p| Some(((p.index + 1) as f64, value(p)?)))
                .collect();
            (r.runtime.clone(), colour(&r.runtime), pts)
        })
        .collect()
}

/// Axis labels on whole pod numbers (at most 20).
fn x_labels(report: &Report) -> usize {
    report.config.pods.clamp(1, 20) + 1
}

/// A tick value without float noise: 0.2, 1, 30, 0.005.
fn short(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// The series legend every panel has: upper right, on a light background.
fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
}

/// (label, the pod's marks as (phase, seconds since Create)) of every pod with a timeline.
type PodPhases = Vec<(String, Vec<(String, f64)>)>;

fn timelines(report: &Report) -> PodPhases {
    report
        .runs
        .iter()
        .flat_map(|r| {
            r.pods.iter().filter_map(move |p| {
                let t = p.timeline.as_ref()?;
                let marks = t
                    .marks
                    .iter()
                    .map(|m| (m.phase.clone(), m.at_ms / 1000.0))
                    .collect();
                Some((format!("{} #{}", r.runtime, p.index + 1), marks))
            })
        })
        .collect()
}

/// A colour per phase, by the phase's position in the first timeline that has it.
fn phase_colour(i: usize) -> RGBColor {
    const PALETTE: [RGBColor; 10] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    PALETTE[i % PALETTE.len()]
}

/// The third panel: one stacked bar per pod with a start timeline, a segment per phase
/// (the time since the previous mark).
fn draw_phases(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    pods: &PodPhases,
) -> Result<(), String> {
    let n = pods.len();
    let top = pods
        .iter()
        .filter_map(|(_, m)| m.last().map(|l| l.1))
        .fold(0.1, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(
            "where the start time goes: per pod with a timeline, Create received -> first output",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0.5..(n as f64 + 0.5), 0.0..top)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("pod with a timeline (start order)")
        .y_desc("seconds")
        .x_labels(n.clamp(1, 20) + 1)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| e.to_string())?;
    let mut order: Vec<String> = Vec::new();
    for (_, marks) in pods {
        for (phase, _) in marks.iter().skip(1) {
            if !order.contains(phase) {
                order.push(phase.clone());
            }
        }
    }
    for (i, phase) in order.iter().enumerate() {
        let c = phase_colour(i);
        let bars: Vec<Rectangle<(f64, f64)>> = pods
            .iter()
            .enumerate()
            .filter_map(|(k, (_, marks))| {
                let j = marks.iter().position(|(p, _)| p == phase)?;
                let (from, to) = (marks[j.checked_sub(1)?].1, marks[j].1);
                let x = (k + 1) as f64;
                Some(Rectangle::new(
                    [(x - 0.35, from), (x + 0.35, to)],
                    c.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(bars)
            .map_err(|e| e.to_string())?
            .label(phase.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], c.filled()));
    }
    draw_legend(&mut chart).map_err(|e| e.to_string())?;
    Ok(())
}

/// Draws the panels into `path` (PNG): latency and memory per pod, and where the start time
/// goes for pods with a timeline.
pub fn draw(report: &Report, path: &Path) -> Result<(), PlotError> {
    ensure_font()?;
    let err = |e: &dyn std::fmt::Display| PlotError::Draw {
        path: path.display().to_string(),
        detail: e.to_string(),
    };
    let timelines = timelines(report);
    let height = if timelines.is_empty() { 850 } else { 1300 };
    let root = BitMapBackend::new(path, (1100, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, rest) = root.split_vertically(420);
    let (bottom, phases) = rest.split_vertically(430);
    if !timelines.is_empty() {
        draw_phases(&phases, &timelines).map_err(|e| err(&e))?;
    }
    let x_range = 0.5..(report.config.pods.max(1) as f64 + 0.5);

    // Latency, seconds, log scale (runc is ~1000x faster than a podvisor pod here).
    let latency = series(report, |p| p.to_first_output_ms.map(|ms| ms / 1000.0));
    let all: Vec<f64> = latency
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(1e-3) / 2.0;
    let hi = all.iter().copied().fold(0.0, f64::max).max(lo * 10.0) * 2.0;
    let lo = if lo.is_finite() { lo } else { 1e-3 };
    let mut chart = ChartBuilder::on(&top)
        .caption(
            "start latency per pod: ctr run -> first output line",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(x_range.clone(), (lo..hi).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("pod # (start order)")
        .y_desc("seconds (log scale)")
        .y_labels(12)
        .x_labels(x_labels(report))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| short(*v))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    for (name, c, pts) in &latency {
        let c = *c;
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))
            .map_err(|e| err(&e))?;
    }
    draw_legend(&mut chart).map_err(|e| err(&e))?;

    // Memory, MiB: total PSS (solid) and overhead outside guest RAM (dashed) per pod.
    let total = series(report, |p| p.pss_kib.map(|k| k as f64 / 1024.0));
    let overhead = series(report, |p| p.overhead_pss_kib.map(|k| k as f64 / 1024.0));
    let max = total
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .fold(TARGET_TOTAL_MIB, f64::max)
        * 1.2;
    let mut chart = ChartBuilder::on(&bottom)
        .caption(
            "host memory per pod: PSS (solid), overhead outside guest RAM (dashed)",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(x_range.clone(), 0.0..max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("pod # (start order)")
        .y_desc("MiB")
        .x_labels(x_labels(report))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    for ((name, c, pts), (_, _, over)) in total.iter().zip(&overhead) {
        let c = *c;
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(format!("{name} PSS"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(DashedLineSeries::new(over.clone(), 6, 4, c.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(format!("{name} overhead"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(1)));
    }
    let grey = RGBColor(140, 140, 140);
    for (target, label) in [
        (TARGET_TOTAL_MIB, "target: total per pod"),
        (TARGET_OVERHEAD_MIB, "target: overhead per pod"),
    ] {
        chart
            .draw_series(DashedLineSeries::new(
                vec![(x_range.start, target), (x_range.end, target)],
                2,
                4,
                grey.stroke_width(1),
            ))
            .map_err(|e| err(&e))?
            .label(format!("{label} ({target} MiB)"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey));
    }
    draw_legend(&mut chart).map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png() {
        if !Path::new(FONT).is_file() {
            eprintln!("*** SKIPPED draws_a_png: {FONT} missing (make deps) ***");
            return;
        }
        let path = std::env::temp_dir().join(format!("podvisor-plot-{}.png", std::process::id()));
        let mut report = crate::density::report::tests::sample();
        draw(&report, &path).unwrap();
        let plain = std::fs::read(&path).unwrap();
        // With timelines: a third panel (a taller image).
        report.runs[1].pods[0].timeline = Some(podvisor_shim::timeline::TimelineRecord {
            pod: "p".into(),
            source: Some("template".into()),
            container: Some("p".into()),
            complete: true,
            marks: ["create", "vm", "agent", "container", "output"]
                .iter()
                .enumerate()
                .map(|(i, phase)| podvisor_shim::timeline::Mark {
                    phase: phase.to_string(),
                    at_ms: (i * i) as f64 * 500.0,
                    vm: None,
                    process_cpu_ms: 0.0,
                    guest_profile: Vec::new(),
                })
                .collect(),
        });
        let tall = std::env::temp_dir().join(format!("podvisor-plot-t-{}.png", std::process::id()));
        draw(&report, &tall).unwrap();
        let with_phases = std::fs::read(&tall).unwrap();
        std::fs::remove_file(&tall).unwrap();
        // PNG IHDR: the height is the big-endian u32 at bytes 20..24.
        let height = |png: &[u8]| u32::from_be_bytes([png[20], png[21], png[22], png[23]]);
        assert_eq!((height(&plain), height(&with_phases)), (850, 1300));
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(
            bytes.len() > 10_000,
            "a plot with content: {} bytes",
            bytes.len()
        );
    }
}
