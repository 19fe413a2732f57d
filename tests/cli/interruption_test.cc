// Ctrl-C and SIGTERM during a calibration or a sweep: the kvplan process exits with 128 + the signal, says which
// stage it stopped and leaves no output and no temporary file.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <string>
#include <vector>

#include "tests/testing/test_util.h"

extern char** environ;

namespace kvplan {
namespace {

namespace fs = std::filesystem;

struct Interrupted {
  int exit_status = -1;
  std::string stderr_text;
};

// Runs `kvplan arguments...`, sends `signal` once its progress on stderr mentions `stage` and collects how it
// ended.
Interrupted Interrupt(std::vector<std::string> arguments, const std::string& stage, int signal) {
  int pipe_fds[2];
  EXPECT_EQ(pipe(pipe_fds), 0);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, pipe_fds[1], STDERR_FILENO);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addclose(&actions, pipe_fds[0]);
  arguments.insert(arguments.begin(), KVPLAN_BINARY);
  std::vector<char*> argv;
  for (std::string& argument : arguments) argv.push_back(argument.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  EXPECT_EQ(posix_spawn(&pid, KVPLAN_BINARY, &actions, nullptr, argv.data(), environ), 0);
  posix_spawn_file_actions_destroy(&actions);
  close(pipe_fds[1]);

  Interrupted result;
  bool signalled = false;
  char buffer[4096];
  for (ssize_t n; (n = read(pipe_fds[0], buffer, sizeof(buffer))) > 0;) {
    result.stderr_text.append(buffer, size_t(n));
    if (!signalled && result.stderr_text.find(stage) != std::string::npos) {
      kill(pid, signal);
      signalled = true;
    }
  }
  close(pipe_fds[0]);
  int status = 0;
  EXPECT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(signalled) << result.stderr_text;
  if (WIFEXITED(status)) result.exit_status = WEXITSTATUS(status);
  return result;
}

// A fresh, empty folder for one test.
fs::path TestFolder(const std::string& name) {
  const fs::path folder = fs::path(::testing::TempDir()) / ("interruption_test_" + name);
  fs::remove_all(folder);
  fs::create_directories(folder);
  return folder;
}

class InterruptionTest : public ::testing::TestWithParam<int> {};

TEST_P(InterruptionTest, ExitsWithTheSignalsStatusNamingTheStageAndWritingNothing) {
  const fs::path folder = TestFolder(std::to_string(GetParam()));
  const std::string model = testing::FixtureModelDir(), data = testing::SharedDir() + "/data/calib-sample.txt";
  const Interrupted interrupted =
      Interrupt({"calibrate", "--model", model, "--data", data, "--device", "cpu", "-o", folder / "plan.kvplan"},
                "statistics", GetParam());
  EXPECT_EQ(interrupted.exit_status, 128 + GetParam()) << interrupted.stderr_text;
  EXPECT_NE(interrupted.stderr_text.find("interrupted during calibration stage '"), std::string::npos)
      << interrupted.stderr_text;
  EXPECT_NE(interrupted.stderr_text.find("'; no plan written"), std::string::npos) << interrupted.stderr_text;
  EXPECT_TRUE(fs::is_empty(folder));
}

INSTANTIATE_TEST_SUITE_P(Signals, InterruptionTest, ::testing::Values(SIGINT, SIGTERM));

TEST(InterruptionTest, ASweepNamesThePointAndStageAndWritesNeitherTableNorPlot) {
  const fs::path folder = TestFolder("sweep");
  const std::string model = testing::FixtureModelDir(), data = testing::SharedDir() + "/data/calib-sample.txt";
  const std::string csv = folder / "sweep.csv", svg = folder / "sweep.svg";
  // A short full-cache evaluation, so the first point's calibration starts soon.
  std::vector<std::string> arguments = {"sweep", "--context", "128", "--max-tokens", "128", "--needle-trials", "1"};
  arguments.insert(arguments.end(), {"--methods", "budget-l2", "--targets", "0.5", "--device", "cpu"});
  arguments.insert(arguments.end(), {"--model", model, "--calibration-data", data, "--eval-data", data});
  arguments.insert(arguments.end(), {"-o", csv, "--svg", svg});
  const Interrupted interrupted = Interrupt(arguments, "statistics", SIGINT);
  EXPECT_EQ(interrupted.exit_status, 128 + SIGINT) << interrupted.stderr_text;
  EXPECT_NE(interrupted.stderr_text.find(
                "interrupted during sweep stage '[1/1] budget-l2 at 0.5: statistics'; no results written"),
            std::string::npos)
      << interrupted.stderr_text;
  EXPECT_TRUE(fs::is_empty(folder));
}

}  // namespace
}  // namespace kvplan
