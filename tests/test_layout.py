"""The package's shape, as a reader meets it: a short README whose links all resolve, docs that stay inside the
repository, a core that a copier takes whole and that imports nothing of the lab, each concern in a named module of
bounded size, and nothing replaced on `Run` at run time."""
import ast
import re
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
PAGES = [REPOSITORY / "README.md", *sorted((REPOSITORY / "docs").glob("*.md"))]
MODULES = [path for path in sorted(REPOSITORY.glob("*.py")) if path.name != "setup.py" and not path.name.startswith("test")]
PACKAGE = {path.stem for path in MODULES}
CORE = "common.py"  # the one module every scheme file imports
SCHEME_FILES = {"fedlearn.py": 550, "splitlearn.py": 600, "splitfed.py": 750}  # at most, with their companions
BESIDE_THE_CORE = ("densenet_split.py", "data.py")  # the model and the data: nothing of the package either


def lines(name):
    return len((REPOSITORY / name).read_text().splitlines())


def imported(name):
    """The top-level names of the modules a file imports."""
    found = set()
    for node in ast.walk(ast.parse((REPOSITORY / name).read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def companions(scheme_file):
    """The files a scheme file's docstring says to copy with it ("To reuse: copy this file with a.py and b.py.")."""
    found = re.search(r"To reuse: copy this file with (.+?)\.\n", (REPOSITORY / scheme_file).read_text())
    assert found, f"{scheme_file} does not say what to copy with it"
    return re.split(r", | and ", found.group(1).replace(", and ", ", "))


def anchors(page):
    """The anchors of a Markdown page's headings, as GitHub makes them (lower case, punctuation dropped, spaces
    to hyphens, a repeated heading numbered)."""
    found, seen = set(), {}
    in_code = False
    for line in page.read_text().splitlines():
        in_code ^= line.startswith("```")
        heading = re.match(r"#{1,6} (.*)", line)
        if heading and not in_code:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return found


def links(page):
    """Every Markdown link target of a page, outside code blocks and code spans."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_the_readme_is_a_first_screen_and_a_map():
    readme = (REPOSITORY / "README.md").read_text().splitlines()
    assert len(readme) <= 200, len(readme)
    commands = [line for line in readme[:12] if line.startswith("pip install")]
    assert any("python bench.py" in line for line in commands) and any("pytest" in line for line in commands)
    assert "docs/course.md" in "\n".join(readme) and "docs/measurements.md" in "\n".join(readme)


def test_every_relative_link_resolves_to_a_page_and_heading_inside_the_repository():
    checked = 0
    for page in PAGES:
        for target in links(page):
            assert not re.match(r"[a-z]+:", target), f"{page.name}: {target} leaves the repository"
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            assert resolved.is_relative_to(REPOSITORY), f"{page.name}: {target} leaves the repository"
            assert resolved.exists(), f"{page.name}: {target} does not exist"
            assert not anchor or anchor in anchors(resolved), f"{page.name}: {target} names no heading there"
            checked += 1
    assert checked > 30


def test_the_course_has_at_least_six_lessons_each_with_what_to_read_a_command_and_questions():
    course = (REPOSITORY / "docs" / "course.md").read_text()
    lessons = re.split(r"\n## (?=Lesson \d+: )", course)[1:]
    assert len(lessons) >= 6
    for number, lesson in enumerate(lessons, 1):
        assert lesson.startswith(f"Lesson {number}: "), lesson[:40]
        assert "**Read**" in lesson and "**Run**" in lesson and "**Questions**" in lesson, lesson[:40]
        assert re.search(r"```\npython bench\.py [^\n]+\n```", lesson), lesson[:40]


def test_a_copier_takes_a_scheme_file_with_its_named_companions_in_few_lines_and_the_core_in_fewer():
    assert lines(CORE) <= 450, lines(CORE)
    for scheme_file, limit in SCHEME_FILES.items():
        files = [scheme_file, *companions(scheme_file)]
        assert CORE in files and sum(map(lines, files)) <= limit, (files, sum(map(lines, files)))
        # what it imports of the package is exactly what it names (with what those name in turn)
        named = {Path(name).stem for name in files}
        assert all(imported(name) & PACKAGE <= named for name in files), scheme_file


def test_the_core_and_what_sits_beside_it_import_torch_numpy_and_the_standard_library_alone():
    allowed = set(sys.stdlib_module_names) | {"torch", "numpy"}
    assert imported(CORE) <= allowed, imported(CORE) - allowed
    for name in BESIDE_THE_CORE:
        assert not imported(name) & PACKAGE, (name, imported(name) & PACKAGE)
    for scheme_file in SCHEME_FILES:  # and the scheme files import nothing of the lab
        assert imported(scheme_file) & PACKAGE <= {Path(name).stem for name in SCHEME_FILES} | {CORE[:-3]}, scheme_file


def test_every_module_is_one_concern_of_at_most_600_lines():
    for module in MODULES:
        assert lines(module.name) <= 600, (module.name, lines(module.name))
        docstring = ast.get_docstring(ast.parse(module.read_text()))
        assert docstring and len(docstring) > 80, f"{module.name} does not say what it is for"


def test_the_installed_package_holds_every_module():
    listed = re.search(r"py_modules=\[(.*?)\]", (REPOSITORY / "setup.py").read_text(), flags=re.S).group(1)
    assert set(re.findall(r'"(\w+)"', listed)) == PACKAGE


def test_no_function_over_60_lines_outside_the_argparse_builder_and_no_class_over_250():
    for module in MODULES:
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                size, limit = node.end_lineno - node.lineno + 1, 250 if isinstance(node, ast.ClassDef) else 60
                assert size <= limit or node.name == "parse_args", f"{module.name}: {node.name} is {size} lines"


def test_nothing_replaces_a_method_of_run_at_run_time():
    """What watches or changes a run is one of its hooks; no module or test patches `Run` itself."""
    patched = re.compile(r"setattr\(\s*(common\.)?Run\b|\bRun\.\w+\s*=[^=]")
    for path in [*REPOSITORY.glob("*.py"), *REPOSITORY.glob("tests/*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not patched.search(line), f"{path.name}:{number}: {line.strip()}"
