//! The error map: one self-contained HTML file (inline SVG and CSS, no
//! script, no network) drawn from one or two reports. It opens with the
//! findings, lone ones first and one line per systematic one (or, for a
//! clean run, the largest ratio to the expected error per stage), then for
//! each step a layers x stages heatmap of each report: local errors
//! judged against their expected error are coloured by that ratio (green
//! up to what the precision explains, yellow at the threshold, red
//! beyond), other errors on a log scale of the error itself (accumulated:
//! rel_l2); the model stages are their own row, routing flips per layer
//! beside it, every finding outlined in red and the first divergence in
//! black; every cell names its place and values on hover (an SVG
//! `<title>`).

use std::fmt::Write as _;

use stage_types::SaveTensorStage;

use crate::Verdict;
use crate::expected::RATIO_THRESHOLD;
use crate::findings::Findings;
use crate::report::{Mode, Report, finding_reason, margins_text, places_text};
use crate::row::{Row, ratio_text};

const CELL_W: usize = 18;
const CELL_H: usize = 10;
const LEFT: usize = 64;
const TOP: usize = 118;
const FLIPS_W: usize = 64;

/// Escapes text for HTML and SVG.
/// `token 3`, or `token 3 "text"` when the capture recorded its text
/// (escaped where it is put into the page).
fn token_label(token: usize, text: Option<&str>) -> String {
    match text {
        Some(text) => format!("token {token} {text:?}"),
        None => format!("token {token}"),
    }
}

fn esc(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The value a cell shows: worst row error for local errors, rel_l2 for
/// accumulated ones.
fn cell_value(row: &Row, mode: Mode) -> Option<f64> {
    let m = row.metrics.as_ref()?;
    Some(match mode {
        Mode::Local => m.worst_row_error,
        Mode::Accumulated => m.rel_l2,
    })
}

/// Linear interpolation between colour stops `(position, rgb)` at `t`.
fn ramp(t: f64, stops: &[(f64, [f64; 3])]) -> String {
    let i = stops.iter().position(|s| s.0 >= t).unwrap_or(stops.len() - 1).max(1);
    let (a, b) = (stops[i - 1], stops[i]);
    let f = ((t - a.0) / (b.0 - a.0)).clamp(0.0, 1.0);
    let c: Vec<u8> = (0..3).map(|k| (a.1[k] + f * (b.1[k] - a.1[k])).round() as u8).collect();
    format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

/// A colour for a ratio to the expected error: dark green for an exact
/// row, green up to 1.5x, yellow at the threshold, red from 10x.
fn ratio_colour(ratio: f64) -> String {
    if ratio.is_nan() || ratio.is_infinite() {
        return "#ff00c8".into();
    }
    if ratio <= 0.0 {
        return "#006837".into();
    }
    let stops = [
        (-1.0, [0.0, 104.0, 55.0]),
        (0.0, [26.0, 152.0, 80.0]),
        (1.5f64.log10(), [102.0, 189.0, 99.0]),
        (RATIO_THRESHOLD.log10(), [254.0, 224.0, 139.0]),
        (1.0, [215.0, 48.0, 39.0]),
    ];
    ramp(ratio.log10().clamp(-1.0, 1.0), &stops)
}

/// A colour for log10(value) on [lo, hi] decades (viridis-like ramp).
fn colour(value: f64, lo: f64, hi: f64) -> String {
    if value.is_nan() || value.is_infinite() {
        return "#ff00c8".into();
    }
    if value <= 0.0 {
        return "#1b0c41".into();
    }
    let t = ((value.log10() - lo) / (hi - lo).max(1e-9)).clamp(0.0, 1.0);
    const STOPS: [(f64, [f64; 3]); 5] = [
        (0.0, [68.0, 1.0, 84.0]),
        (0.25, [59.0, 82.0, 139.0]),
        (0.5, [33.0, 145.0, 140.0]),
        (0.75, [94.0, 201.0, 98.0]),
        (1.0, [253.0, 231.0, 37.0]),
    ];
    ramp(t, &STOPS)
}

/// The colour scale's range in decades, from the finite positive values
/// of cells not coloured by their ratio.
fn decade_range(reports: &[&Report]) -> (f64, f64) {
    let logs: Vec<f64> = reports
        .iter()
        .flat_map(|r| r.rows.iter().filter(|row| row.expected.is_none()).filter_map(move |row| cell_value(row, r.mode)))
        .filter(|v| v.is_finite() && *v > 0.0)
        .map(f64::log10)
        .collect();
    let lo = logs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if lo.is_finite() { (lo.floor(), hi.ceil().max(lo.floor() + 1.0)) } else { (-8.0, 0.0) }
}

fn title_of(row: &Row, mode: Mode) -> String {
    let mut t = row.place();
    let _ = write!(t, "\n{}", row.verdict.label());
    if let Some(m) = &row.metrics {
        let _ = write!(
            t,
            "\nrel_l2 {:.3e} (tol {:.0e})\nworst row error {:.3e}\nmin row cosine {:.6}",
            m.rel_l2, row.tolerance, m.worst_row_error, m.min_row_cosine
        );
    }
    if let Some(tok) = row.worst_token {
        let _ = write!(t, "\n{}", token_label(tok, row.worst_token_text.as_deref()));
    }
    if let Some(e) = row.worst_expert {
        let _ = write!(t, "\nexpert {e}");
    }
    if let Some(rank) = row.worst_rank {
        let _ = write!(t, "\nrank {rank}");
    }
    if let Some(e) = &row.expected {
        let _ = write!(
            t,
            "\n{} expected: worst row error {:.3e} vs {:.3e} expected (floor {:.0e})",
            ratio_text(e.ratio),
            e.error,
            e.expected,
            e.floor
        );
    }
    if row.finding.is_some() {
        let _ = write!(t, "\nFINDING: {}", finding_reason(row));
    }
    if let Some(input) = &row.follows {
        let _ = write!(t, "\nnot a finding: follows from the finding of {input}");
    }
    if !row.flipped.is_empty() {
        let _ = write!(t, "\n{} flipped tokens", row.flipped.len());
    }
    let _ = write!(t, "\n({})", if mode == Mode::Local { "local error" } else { "accumulated error" });
    t
}

/// One step's heatmap of one report as an SVG element.
fn panel(report: &Report, step: usize, stages: &[SaveTensorStage], layers: usize, range: (f64, f64)) -> String {
    let rows: Vec<&Row> = report.rows.iter().filter(|r| r.step == step).collect();
    let ratio_map = report.mode == Mode::Local && report.rows.iter().any(|r| r.expected.is_some());
    let first =
        report.first_divergence().filter(|_| report.mode == Mode::Accumulated).map(|r| (r.step, r.layer, r.stage));
    let width = LEFT + stages.len() * CELL_W + FLIPS_W + 10;
    let height = TOP + (layers + 2) * CELL_H + 10;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" class="panel">"#
    );
    for (i, s) in stages.iter().enumerate() {
        let x = LEFT + i * CELL_W + CELL_W / 2;
        let _ = write!(
            svg,
            r#"<text x="{x}" y="{}" transform="rotate(-60 {x} {})" class="stage">{}</text>"#,
            TOP - 4,
            TOP - 4,
            s.name()
        );
    }
    let _ = write!(svg, r#"<text x="{}" y="{}" class="stage">flips</text>"#, LEFT + stages.len() * CELL_W + 6, TOP - 4);
    // Row 0: model stages; rows 1..: layers.
    for y in 0..=layers {
        let label = if y == 0 { "model".to_string() } else { format!("L{}", y - 1) };
        let _ =
            write!(svg, r#"<text x="{}" y="{}" class="layer">{label}</text>"#, LEFT - 4, TOP + y * CELL_H + CELL_H - 2);
    }
    let mut outlines = String::new();
    for row in &rows {
        let Some(col) = stages.iter().position(|s| *s == row.stage) else { continue };
        let y = match row.layer {
            None => 0,
            Some(l) => l + 1,
        };
        let (x, y) = (LEFT + col * CELL_W, TOP + y * CELL_H);
        let fill = match (&row.verdict, cell_value(row, report.mode)) {
            (Verdict::Missing { .. }, _) => "#d0d0d0".to_string(),
            // Not a finding of its own: its input's (check of an edited capture).
            _ if row.follows.is_some() => "#9e9e9e".to_string(),
            (_, Some(_)) if report.mode == Mode::Local && row.expected.is_some() => {
                ratio_colour(row.expected.as_ref().map_or(0.0, |e| e.ratio))
            }
            // Nothing left to compare (every token of the step flipped on
            // a near-tie): no error, on the ratio map's scale.
            (_, Some(v)) if ratio_map && v == 0.0 => ratio_colour(0.0),
            (_, Some(v)) => colour(v, range.0, range.1),
            // Expert ids agreeing: as good as it gets, on either scale.
            (Verdict::Ok, None) if ratio_map => ratio_colour(0.0),
            (Verdict::Ok, None) => "#3b528b".to_string(),
            // Flips on near-ties only: what the precision explains, so
            // green on the ratio map (the flips column counts them).
            (Verdict::RoutingFlip, None) if ratio_map => ratio_colour(1.0),
            (Verdict::RoutingFlip, None) => "#ffb000".to_string(),
            (_, None) => "#e41a1c".to_string(),
        };
        let _ = write!(
            svg,
            r#"<rect x="{x}" y="{y}" width="{CELL_W}" height="{CELL_H}" fill="{fill}"><title>{}</title></rect>"#,
            esc(&title_of(row, report.mode))
        );
        let finding = row.finding.is_some() || matches!(row.verdict, Verdict::WrongRouter);
        let outline = if first == Some((row.step, row.layer, row.stage)) {
            Some("first")
        } else if finding {
            Some("finding")
        } else {
            None
        };
        if let Some(class) = outline {
            let _ = write!(
                outlines,
                r#"<rect x="{}" y="{}" width="{}" height="{}" class="{class}"/>"#,
                x + 1,
                y + 1,
                CELL_W - 2,
                CELL_H - 2
            );
        }
    }
    for row in rows.iter().filter(|r| !r.flipped.is_empty()) {
        let y = TOP + (row.layer.map_or(0, |l| l + 1)) * CELL_H;
        let near = row.flipped.iter().filter(|f| f.near_tie).count();
        let margins: Vec<String> = row
            .flipped
            .iter()
            .map(|f| {
                format!(
                    "{}: margin {}{}",
                    token_label(f.token, f.text.as_deref()),
                    f.ref_margin.map_or("?".into(), |m| format!("{m:.2e}")),
                    if f.near_tie { " (near-tie)" } else { " (WRONG ROUTER)" }
                )
            })
            .collect();
        let class = if near == row.flipped.len() { "flip" } else { "wrong" };
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" class="{class}">{} ({} near)<title>{}</title></text>"#,
            LEFT + stages.len() * CELL_W + 6,
            y + CELL_H - 2,
            row.flipped.len(),
            near,
            esc(&format!("{}\n{}", row.place(), margins.join("\n")))
        );
    }
    svg += &outlines;
    svg += "</svg>";
    svg
}

fn legend(range: (f64, f64)) -> String {
    let mut svg = String::from(r#"<svg xmlns="http://www.w3.org/2000/svg" width="460" height="40" class="legend">"#);
    let steps = 40;
    for i in 0..steps {
        let d = range.0 + (range.1 - range.0) * i as f64 / (steps - 1) as f64;
        let _ = write!(
            svg,
            r#"<rect x="{}" y="4" width="10" height="14" fill="{}"/>"#,
            10 + i * 10,
            colour(10f64.powf(d), range.0, range.1)
        );
    }
    let _ = write!(svg, r#"<text x="10" y="32" class="tick">1e{}</text>"#, range.0);
    let _ = write!(svg, r#"<text x="380" y="32" class="tick">1e{}</text>"#, range.1);
    svg += r##"<rect x="420" y="4" width="14" height="14" fill="#ff00c8"/><text x="438" y="16" class="tick">nan</text></svg>"##;
    svg
}

/// The legend of the ratio colours.
fn ratio_legend() -> String {
    let mut svg = String::from(r#"<svg xmlns="http://www.w3.org/2000/svg" width="460" height="40" class="legend">"#);
    let steps = 40;
    for i in 0..steps {
        let d = -1.0 + 2.0 * i as f64 / (steps - 1) as f64;
        let _ = write!(
            svg,
            r#"<rect x="{}" y="4" width="10" height="14" fill="{}"/>"#,
            10 + i * 10,
            ratio_colour(10f64.powf(d))
        );
    }
    let x = |ratio: f64| 10.0 + (ratio.log10() + 1.0) / 2.0 * 400.0;
    for (ratio, label) in [(0.1, "0.1x"), (1.0, "1x"), (RATIO_THRESHOLD, "threshold"), (10.0, "10x")] {
        let _ = write!(svg, r#"<text x="{:.0}" y="32" class="tick">{label}</text>"#, x(ratio) - 6.0);
    }
    svg += r##"<rect x="420" y="4" width="14" height="14" fill="#ff00c8"/><text x="438" y="16" class="tick">nan</text></svg>"##;
    svg
}

/// The findings of a local report, lone ones first, then one line per
/// systematic one.
fn local_findings(r: &Report, grouped: &Findings) -> String {
    let mut body = format!(
        "<p>{} lone finding(s), {} systematic:</p><ul class=\"findings\">",
        grouped.lone.len(),
        grouped.systematic.len()
    );
    for &i in &grouped.lone {
        body += &finding_line(&r.rows[i]);
    }
    for s in &grouped.systematic {
        let (rank, cause) = r.group_cause(s);
        let _ = write!(
            body,
            "<li><b>{}, {}, {} of {} layers{rank}</b>: {} to {} expected; one cause ({cause}). <span class=\"places\">{}</span></li>",
            s.stage,
            s.phase.label(),
            s.layers.len(),
            s.layers_compared,
            ratio_text(s.min_ratio),
            ratio_text(s.max_ratio),
            esc(&places_text(&s.places, 8))
        );
    }
    body + "</ul>"
}

fn finding_line(row: &Row) -> String {
    let what = if row.finding.is_some() {
        finding_reason(row)
    } else {
        format!("{}; rel_l2 {}", row.verdict.label(), row.rel_l2().map_or("-".into(), |e| format!("{e:.3e}")))
    };
    let mut place = row.place();
    if let Some(t) = row.worst_token {
        let _ = write!(place, ", {}", token_label(t, row.worst_token_text.as_deref()));
    }
    if let Some(e) = row.worst_expert {
        let _ = write!(place, ", expert {e}");
    }
    if let Some(rank) = row.worst_rank {
        let _ = write!(place, ", rank {rank}");
    }
    format!("<li><b>{}</b>: {}</li>", esc(&place), esc(&what))
}

/// The error map of `reports` (one local and one accumulated report, or
/// either alone) as one self-contained HTML page.
pub fn render_html(reports: &[&Report]) -> String {
    let range = decade_range(reports);
    let mut stages: Vec<SaveTensorStage> = SaveTensorStage::ALL
        .iter()
        .copied()
        .filter(|s| reports.iter().any(|r| r.rows.iter().any(|row| row.stage == *s)))
        .collect();
    if stages.is_empty() {
        stages = SaveTensorStage::ALL.to_vec();
    }
    let layers = reports.iter().flat_map(|r| r.rows.iter().filter_map(|row| row.layer)).max().map_or(0, |l| l + 1);
    let mut steps: Vec<usize> = reports.iter().flat_map(|r| r.rows.iter().map(|row| row.step)).collect();
    steps.sort_unstable();
    steps.dedup();
    let mut body = String::new();
    for r in reports {
        let kind = if r.mode == Mode::Local {
            "Local errors (each stage on the same inputs)"
        } else {
            "Accumulated errors (free-running)"
        };
        let findings = r.findings();
        let _ = write!(
            body,
            "<section><h2>{kind}</h2><p>reference: {}<br>target: {}</p>",
            esc(&r.reference),
            esc(&r.target)
        );
        if findings.is_empty() {
            body += if r.mode == Mode::Local {
                "<p class=\"clean\">No finding: every stage's local error is within what the target's precision explains.</p>"
            } else {
                "<p class=\"clean\">No divergence.</p>"
            };
        } else if r.mode == Mode::Local {
            body += &local_findings(r, &r.grouped_findings());
        } else {
            let _ = write!(body, "<p>{} finding(s):</p><ul class=\"findings\">", findings.len());
            for f in findings {
                body += &finding_line(f);
            }
            body += "</ul>";
        }
        if r.mode == Mode::Local
            && let Some(line) = margins_text(&r.margins())
        {
            let _ = write!(body, "<p class=\"note\">{}</p>", esc(&line));
        }
        if let Some(g) = &r.graft {
            let _ = write!(
                body,
                "<p>graft: {} (rel_l2 {:.3e})</p>",
                if g.stage_is_wrong { "the stage itself is wrong" } else { "the stage only amplifies upstream drift" },
                g.rel_l2
            );
        }
        for note in &r.notes {
            let _ = write!(body, "<p class=\"note\">note: {}</p>", esc(note));
        }
        body += "</section>";
    }
    body += "<div class=\"row\">";
    for step in &steps {
        for r in reports {
            let label = match (r.mode, r.rows.iter().any(|row| row.expected.is_some())) {
                (Mode::Local, true) => "local: ratio to the expected error",
                (Mode::Local, false) => "local: worst row error",
                _ => "accumulated: rel_l2",
            };
            let _ = write!(
                body,
                "<figure><figcaption><b>step {step}</b> {label}</figcaption>{}</figure>",
                panel(r, *step, &stages, layers, range)
            );
        }
    }
    body += "</div>";
    format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>moetrace error map</title>
<style>
body {{ font-family: sans-serif; margin: 16px; color: #222; }}
h1 {{ font-size: 20px; }} h2 {{ font-size: 16px; margin-bottom: 4px; }} h3 {{ font-size: 14px; margin: 8px 0 0; }}
.row {{ display: flex; flex-wrap: wrap; gap: 24px; }}
figure {{ margin: 0; }} figcaption {{ font-size: 12px; color: #555; }}
.stage, .layer, .tick {{ font-size: 9px; fill: #333; }} .layer {{ text-anchor: end; }}
.flip {{ font-size: 9px; fill: #b07000; }} .wrong {{ font-size: 9px; fill: #d00000; font-weight: bold; }}
.finding {{ fill: none; stroke: #ff0000; stroke-width: 2.5; }} .places {{ color: #666; font-size: 11px; }} .first {{ fill: none; stroke: #000; stroke-width: 3; }}
.findings li {{ color: #b00000; }} .clean {{ color: #176f2c; }} .note {{ color: #666; font-size: 12px; }}
</style></head><body>
<h1>moetrace error map</h1>
<p>Colour: local errors by their ratio to the error a correct implementation of the target's precision makes on the same row (green: as good as the precision allows, routing flips on near-ties included; yellow: the threshold; red: beyond), other errors by log10 of the error. Hover a cell for its place and values. Grey: an error that follows from a finding in its input at the same token (a capture holding a value its engine did not consume). Red outline: a finding or a wrong router; black: the first divergence. Flips: tokens whose expert set differs, with near-ties counted.</p>
{}{}
{body}
</body></html>
"#,
        if reports.iter().any(|r| r.rows.iter().any(|row| row.expected.is_some())) {
            ratio_legend()
        } else {
            String::new()
        },
        if reports.iter().any(|r| r.rows.iter().any(|row| row.expected.is_none() && cell_value(row, r.mode).is_some()))
        {
            legend(range)
        } else {
            String::new()
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expected::Expected;
    use crate::findings::mark_findings;
    use crate::tensor_metrics;

    #[test]
    fn the_page_is_self_contained_and_marks_the_outlier() {
        let mut report =
            Report { mode: Mode::Local, reference: "cpu <ref>".into(), target: "gpu".into(), ..Report::default() };
        for layer in 0..6 {
            for stage in [SaveTensorStage::AttnOut, SaveTensorStage::MoeExpertOut] {
                let mut row = Row::new(0, Some(layer), stage, 3e-2);
                let e = if layer == 4 && stage == SaveTensorStage::MoeExpertOut { 0.05 } else { 0.002 };
                row.set_metrics(tensor_metrics(
                    crate::Elements::F64(&[1.0, 1.0]),
                    crate::Elements::F64(&[1.0, 1.0 + e * 2f64.sqrt()]),
                    &[2],
                    0,
                ));
                row.expected = Some(Expected {
                    ratio: e / 0.002,
                    row: 0,
                    error: e,
                    expected: 0.002,
                    floor: 1e-4,
                    emulated_rel_l2: 0.002,
                    accumulated_ratio: e / 0.002,
                    from_replay: false,
                });
                report.rows.push(row);
            }
        }
        mark_findings(&mut report.rows);
        let html = render_html(&[&report]);
        assert!(html.starts_with("<!DOCTYPE html>") && html.ends_with("</html>\n"));
        assert!(!html.contains("<script"), "no script");
        let svg_namespace = "xmlns=\"http://www.w3.org/2000/svg\"";
        assert_eq!(
            html.matches("http").count(),
            html.matches(svg_namespace).count(),
            "no address but the SVG namespace"
        );
        assert!(!html.contains("src=") && !html.contains("href="), "no external resources");
        assert_eq!(html.matches("class=\"finding\"").count(), 1);
        assert!(html.contains("25.00x"), "the finding's ratio is shown");
        assert!(html.contains("step 0 layer 4 moe_expert_out"));
        assert!(html.contains("cpu &lt;ref&gt;"));
    }

    #[test]
    fn near_tie_flips_are_green_on_a_local_map_and_amber_elsewhere() {
        let flip = |mode: Mode| {
            let mut report = Report { mode, reference: "a".into(), target: "b".into(), ..Report::default() };
            let mut ids = Row::new(0, Some(0), SaveTensorStage::MoeRouterIndices, 0.0);
            ids.verdict = Verdict::RoutingFlip;
            let mut out = Row::new(0, Some(0), SaveTensorStage::AttnOut, 3e-2);
            out.set_metrics(tensor_metrics(crate::Elements::F64(&[1.0]), crate::Elements::F64(&[1.0]), &[1], 0));
            out.expected = Some(Expected {
                ratio: 1.0,
                row: 0,
                error: 1e-3,
                expected: 1e-3,
                floor: 1e-4,
                emulated_rel_l2: 1e-3,
                accumulated_ratio: 1.0,
                from_replay: false,
            });
            report.rows.extend([ids, out]);
            render_html(&[&report])
        };
        assert!(flip(Mode::Local).contains(&format!("fill=\"{}\"", ratio_colour(1.0))));
        assert!(!flip(Mode::Local).contains("#ffb000"));
        assert!(flip(Mode::Accumulated).contains("#ffb000"));
    }

    #[test]
    fn tokens_are_named_by_their_text_escaped() {
        let mut report = Report { reference: "a".into(), target: "b".into(), ..Report::default() };
        let mut row = Row::new(1, Some(0), SaveTensorStage::AttnOut, 1e-4);
        row.set_metrics(tensor_metrics(
            crate::Elements::F64(&[1.0, 1.0]),
            crate::Elements::F64(&[1.0, 2.0]),
            &[1, 2],
            1,
        ));
        row.worst_token = Some(0);
        row.worst_token_text = Some("<b>专家".into());
        report.rows.push(row);
        let html = render_html(&[&report]);
        assert!(html.contains("token 0 &quot;&lt;b&gt;专家&quot;"), "{html}");
        assert!(!html.contains("<b>专家"));
    }
}
