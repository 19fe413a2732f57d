#include "sweep/sweep_report.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace kvplan {
namespace {

constexpr std::string_view kCsvHeaderStart = "method,target,meets_target,";
constexpr std::string_view kSvgDescription = "<desc>kvplan sweep</desc>";

// A CSV cell: empty where nothing was measured.
std::string Cell(std::optional<double> value) {
  return value && std::isfinite(*value) ? absl::StrFormat("%.6g", *value) : "";
}

std::vector<const SweepPoint*> Rows(const SweepResult& result) {
  std::vector<const SweepPoint*> rows = {&result.full_cache};
  for (const SweepPoint& point : result.points) rows.push_back(&point);
  return rows;
}

// Method names in the order their first point appears.
std::vector<std::string> MethodsInOrder(const SweepResult& result) {
  std::vector<std::string> methods;
  for (const SweepPoint& point : result.points)
    if (std::find(methods.begin(), methods.end(), point.method) == methods.end()) methods.push_back(point.method);
  return methods;
}

// The model directory's last component: the title names the model, not where it lies.
std::string ModelName(const std::string& model_dir) {
  const std::string_view trimmed = std::string_view(model_dir).substr(0, model_dir.find_last_not_of('/') + 1);
  return std::string(trimmed.substr(trimmed.find_last_of('/') + 1));
}

std::string EscapeXml(std::string_view text) {
  std::string escaped;
  for (char c : text) {
    switch (c) {
      case '&': escaped += "&amp;"; break;
      case '<': escaped += "&lt;"; break;
      case '>': escaped += "&gt;"; break;
      case '"': escaped += "&quot;"; break;
      default: escaped += c;
    }
  }
  return escaped;
}

// The plot's geometry in pixels: two panels side by side, each a plot area with margins for ticks and titles,
// and the legend in rows beneath them.
constexpr double kPlotWidth = 340, kPlotHeight = 240;
constexpr double kMarginLeft = 64, kMarginRight = 24, kMarginTop = 64, kMarginBottom = 52;
constexpr double kPanelWidth = kMarginLeft + kPlotWidth + kMarginRight;
constexpr double kLegendRowHeight = 20, kLegendEntryWidth = 214;
constexpr int kLegendColumns = 4;
// Matplotlib's tab10: distinguishable, and readable for the common colour-vision deficiencies.
constexpr const char* kPalette[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};

// Data values onto [0, 1] of an axis, linearly or by log2.
struct Scale {
  double lo = 0, hi = 1;
  bool log2 = false;
  double operator()(double value) const {
    auto transform = [this](double v) { return log2 ? std::log2(v) : v; };
    return (transform(value) - transform(lo)) / (transform(hi) - transform(lo));
  }
};

// About `count` ticks at 1, 2 or 5 times a power of ten, widening [lo, hi] to whole steps.
std::vector<double> NiceTicks(Scale& scale, int count) {
  if (!(scale.hi > scale.lo)) scale.hi = scale.lo + 1;
  const double raw = (scale.hi - scale.lo) / count;
  const double magnitude = std::pow(10.0, std::floor(std::log10(raw)));
  double step = 10 * magnitude;
  for (double factor : {1.0, 2.0, 5.0})
    if (factor * magnitude >= raw) {
      step = factor * magnitude;
      break;
    }
  scale.lo = std::floor(scale.lo / step) * step;
  scale.hi = std::ceil(scale.hi / step) * step;
  std::vector<double> ticks;
  // Steps of 0.1 do not add up exactly: the loop bound and the snap to zero absorb the drift.
  for (double tick = scale.lo; tick <= scale.hi + step / 2; tick += step)
    ticks.push_back(std::abs(tick) < step / 2 ? 0 : tick);
  return ticks;
}

struct Series {
  std::string method;
  std::vector<std::pair<double, double>> points;  // (x, y), sorted by x
};

struct Panel {
  double left = 0;  // the plot area's top-left corner
  double top = kMarginTop;
  Scale x, y;
  double X(double value) const { return left + kPlotWidth * x(value); }
  double Y(double value) const { return top + kPlotHeight * (1 - y(value)); }
};

// Frame, grid, ticks and titles of one panel; both panels' y values are percentages.
void DrawAxes(const Panel& panel, const std::vector<double>& y_ticks, std::string_view title, std::string& svg) {
  absl::StrAppendFormat(&svg, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" font-size=\"14\">%s</text>\n",
                        panel.left + kPlotWidth / 2, panel.top - 12, EscapeXml(title));
  for (double tick = panel.x.lo; tick <= panel.x.hi; tick *= 2) {  // powers of two: exact in a double
    const double x = panel.X(tick);
    absl::StrAppendFormat(&svg,
                          "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#e0e0e0\"/>"
                          "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%gx</text>\n",
                          x, panel.top, x, panel.top + kPlotHeight, x, panel.top + kPlotHeight + 16, tick);
  }
  for (double tick : y_ticks) {
    const double y = panel.Y(tick);
    absl::StrAppendFormat(&svg,
                          "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#e0e0e0\"/>"
                          "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%g%%</text>\n",
                          panel.left, y, panel.left + kPlotWidth, y, panel.left - 6, y + 4, tick);
  }
  absl::StrAppendFormat(&svg,
                        "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" stroke=\"#333\"/>\n"
                        "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">KV reduction (full cache bytes / plan "
                        "bytes, log scale)</text>\n",
                        panel.left, panel.top, kPlotWidth, kPlotHeight, panel.left + kPlotWidth / 2,
                        panel.top + kPlotHeight + 38);
}

// The full cache's level as a dashed line, then one polyline with markers per method.
void DrawData(const Panel& panel, std::optional<double> full_cache, const std::vector<Series>& series,
              std::string& svg) {
  if (full_cache)
    absl::StrAppendFormat(&svg,
                          "<line class=\"full-cache\" x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#000\" "
                          "stroke-dasharray=\"6 4\"/>\n",
                          panel.left, panel.Y(*full_cache), panel.left + kPlotWidth, panel.Y(*full_cache));
  for (size_t m = 0; m < series.size(); ++m) {
    const char* color = kPalette[m % std::size(kPalette)];
    std::vector<std::string> coordinates;
    for (const auto& [x, y] : series[m].points)
      coordinates.push_back(absl::StrFormat("%.1f,%.1f", panel.X(x), panel.Y(y)));
    absl::StrAppendFormat(
        &svg, "<polyline data-method=\"%s\" points=\"%s\" fill=\"none\" stroke=\"%s\" stroke-width=\"2\"/>\n",
        EscapeXml(series[m].method), absl::StrJoin(coordinates, " "), color);
    for (const auto& [x, y] : series[m].points)
      absl::StrAppendFormat(
          &svg, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"4\" fill=\"%s\"><title>%s: %.2fx, %.4g%%</title></circle>\n",
          panel.X(x), panel.Y(y), color, EscapeXml(series[m].method), x, y);
  }
}

void DrawPanel(const Panel& panel, const std::vector<double>& y_ticks, std::string_view title,
               std::optional<double> full_cache, const std::vector<Series>& series, std::string& svg) {
  svg += "<g class=\"panel\">\n";
  DrawAxes(panel, y_ticks, title, svg);
  DrawData(panel, full_cache, series, svg);
  svg += "</g>\n";
}

// Each method's points as (reduction, value), where `value` has one.
std::vector<Series> MethodSeries(const SweepResult& result,
                                 const std::function<std::optional<double>(const SweepPoint&)>& value) {
  std::vector<Series> series;
  for (const std::string& method : MethodsInOrder(result)) {
    Series line = {.method = method};
    for (const SweepPoint& point : result.points)
      if (point.method == method && point.kv_bytes > 0)
        if (const std::optional<double> y = value(point); y && std::isfinite(*y))
          line.points.emplace_back(point.kv_reduction(), *y);
    std::sort(line.points.begin(), line.points.end());
    series.push_back(std::move(line));
  }
  return series;
}

// A power of two at or beyond every reduction, spanning at least 1x to 32x.
Scale ReductionScale(const SweepResult& result) {
  Scale scale = {.lo = 1, .hi = 32, .log2 = true};
  for (const SweepPoint& point : result.points) {
    if (point.kv_bytes <= 0) continue;
    scale.lo = std::min(scale.lo, std::exp2(std::floor(std::log2(point.kv_reduction()))));
    scale.hi = std::max(scale.hi, std::exp2(std::ceil(std::log2(point.kv_reduction()))));
  }
  return scale;
}

}  // namespace

double PerplexityDeltaPercent(const SweepPoint& point, const SweepPoint& full_cache) {
  return 100.0 * (point.perplexity.perplexity / full_cache.perplexity.perplexity - 1.0);
}

std::optional<double> NeedleAccuracy(const SweepPoint& point) {
  int correct = 0, trials = 0;
  for (const NeedleResult& needle : point.needle) {
    correct += needle.correct;
    trials += needle.trials;
  }
  if (trials == 0) return std::nullopt;
  return double(correct) / trials;
}

std::string SweepCsv(const SweepResult& result) {
  std::vector<std::string> header = absl::StrSplit(
      "method,target,meets_target,context,kv_bytes,full_kv_bytes,kv_reduction,perplexity,perplexity_se,"
      "delta_perplexity_pct,kl_mean,kl_se,top1_agreement,top1_se",
      ',');
  for (const NeedleResult& needle : result.full_cache.needle) {
    header.push_back(absl::StrCat("needle_", needle.context_length));
    header.push_back(absl::StrCat("full_needle_", needle.context_length));
  }
  header.insert(header.end(), {"calibration_s", "eval_s"});
  std::string csv = absl::StrCat(absl::StrJoin(header, ","), "\n");
  for (const SweepPoint* point : Rows(result)) {
    const std::optional<DivergenceResult>& divergence = point->divergence;
    std::vector<std::string> cells = {point->method,
                                      Cell(point->target),
                                      point->meets_target ? "true" : "false",
                                      absl::StrCat(result.context),
                                      absl::StrCat(point->kv_bytes),
                                      absl::StrCat(point->full_kv_bytes),
                                      Cell(point->kv_reduction()),
                                      Cell(point->perplexity.perplexity),
                                      Cell(point->perplexity.standard_error),
                                      Cell(PerplexityDeltaPercent(*point, result.full_cache)),
                                      Cell(divergence ? std::optional(divergence->kl_mean) : std::nullopt),
                                      Cell(divergence ? std::optional(divergence->kl_standard_error) : std::nullopt),
                                      Cell(divergence ? std::optional(divergence->top1_agreement) : std::nullopt),
                                      Cell(divergence ? std::optional(divergence->top1_standard_error) : std::nullopt)};
    for (size_t i = 0; i < result.full_cache.needle.size(); ++i) {
      const bool measured = i < point->needle.size() && point->needle[i].trials > 0;
      cells.push_back(Cell(measured ? std::optional(point->needle[i].accuracy()) : std::nullopt));
      cells.push_back(Cell(result.full_cache.needle[i].accuracy()));
    }
    cells.push_back(Cell(point->calibration_seconds));
    cells.push_back(Cell(point->eval_seconds));
    absl::StrAppend(&csv, absl::StrJoin(cells, ","), "\n");
  }
  return csv;
}

std::string SweepText(const SweepResult& result) {
  std::string text = absl::StrFormat("%-14s %6s %9s %19s %8s %9s %6s %6s %8s %7s\n", "method", "target", "reduction",
                                     "perplexity", "delta", "KL", "top-1", "needle", "calib s", "eval s");
  for (const SweepPoint* point : Rows(result)) {
    const std::optional<DivergenceResult>& divergence = point->divergence;
    const std::optional<double> needle = NeedleAccuracy(*point);
    absl::StrAppendFormat(&text, "%-14s %6.3f %8.2fx %10.3f ± %6.3f %+7.1f%% %9s %6s %6s %8.1f %7.1f%s\n",
                          point->method, point->target, point->kv_reduction(), point->perplexity.perplexity,
                          point->perplexity.standard_error, PerplexityDeltaPercent(*point, result.full_cache),
                          divergence ? absl::StrFormat("%.5f", divergence->kl_mean) : "-",
                          divergence ? absl::StrFormat("%.3f", divergence->top1_agreement) : "-",
                          needle ? absl::StrFormat("%.3f", *needle) : "-", point->calibration_seconds,
                          point->eval_seconds, point->meets_target ? "" : "  (target missed)");
  }
  return text;
}

std::string SweepSvg(const SweepResult& result) {
  const std::vector<Series> perplexity = MethodSeries(
      result, [&](const SweepPoint& point) { return std::optional(PerplexityDeltaPercent(point, result.full_cache)); });
  const std::vector<Series> needle = MethodSeries(result, [](const SweepPoint& point) {
    const std::optional<double> accuracy = NeedleAccuracy(point);
    return accuracy ? std::optional(100 * *accuracy) : std::nullopt;
  });
  const Scale reduction = ReductionScale(result);
  Panel left = {.left = kMarginLeft, .x = reduction, .y = {.lo = 0, .hi = 1}};
  for (const Series& line : perplexity)
    for (const auto& point : line.points) {
      left.y.lo = std::min(left.y.lo, point.second);
      left.y.hi = std::max(left.y.hi, point.second);
    }
  const std::vector<double> perplexity_ticks = NiceTicks(left.y, 6);
  Panel right = {.left = kPanelWidth + kMarginLeft, .x = reduction, .y = {.lo = 0, .hi = 100}};
  const std::vector<double> needle_ticks = NiceTicks(right.y, 5);

  const int legend_entries = int(perplexity.size()) + 1;  // the methods and the full cache
  const double legend_top = kMarginTop + kPlotHeight + kMarginBottom;
  const double width = 2 * kPanelWidth;
  const double height = legend_top + kLegendRowHeight * ((legend_entries + kLegendColumns - 1) / kLegendColumns) + 8;
  std::string svg = absl::StrFormat(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\" "
      "font-family=\"sans-serif\" font-size=\"11\">\n%s\n<rect width=\"100%%\" height=\"100%%\" fill=\"#fff\"/>\n"
      "<text x=\"%.1f\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">%s</text>\n",
      width, height, width, height, kSvgDescription, width / 2,
      EscapeXml(absl::StrFormat("kvplan sweep: %s, %d-token context, %s", ModelName(result.model_dir), result.context,
                                result.device)));
  DrawPanel(left, perplexity_ticks, "perplexity change vs the full cache", 0.0, perplexity, svg);
  const std::optional<double> full_needle = NeedleAccuracy(result.full_cache);
  DrawPanel(right, needle_ticks, "needle (pass-key) accuracy",
            full_needle ? std::optional(100 * *full_needle) : std::nullopt, needle, svg);

  svg += "<g class=\"legend\">\n";
  for (int i = 0; i < legend_entries; ++i) {
    const double x = kMarginLeft + kLegendEntryWidth * (i % kLegendColumns);
    const double y = legend_top + kLegendRowHeight * (i / kLegendColumns);
    const bool full = i == int(perplexity.size());
    absl::StrAppendFormat(&svg,
                          "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"2\"%s/>"
                          "<text x=\"%.1f\" y=\"%.1f\">%s</text>\n",
                          x, y, x + 24, y, full ? "#000" : kPalette[i % std::size(kPalette)],
                          full ? " stroke-dasharray=\"6 4\"" : "", x + 30, y + 4,
                          EscapeXml(full ? std::string("full cache") : perplexity[i].method));
  }
  svg += "</g>\n</svg>\n";
  return svg;
}

bool IsSweepCsv(std::string_view text) { return text.starts_with(kCsvHeaderStart); }

bool IsSweepSvg(std::string_view text) {
  return text.starts_with("<svg") && text.find(kSvgDescription) != std::string_view::npos;
}

}  // namespace kvplan
